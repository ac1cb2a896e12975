"""The memory tracker on hand-computed cases, the estimate against a real CPU run, and the estimate of a full-size
checkpoint file without reading its tensors."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import agreement_settings

from dreambooth.bench import bench_architecture
from dreambooth.memory.dryrun import TrackedTrainer
from dreambooth.memory.estimate import ARCH_SHORTCUTS, Estimate, architecture_of, estimate, format_estimate
from dreambooth.memory.tracker import ACTIVATIONS, GRADIENTS, OPTIMIZER_STATES, MemoryTracker
from dreambooth.settings import Settings

# ------------------------------------------------------------------------------------------------ the tracker


def test_tracker_counts_allocations_and_frees_exactly():
    with MemoryTracker("cpu") as tracker:
        a = torch.empty(1000)  # 4000 bytes: one 4096-byte block (the CUDA allocator's 512-byte rounding)
        b = torch.empty(256, dtype=torch.float64)  # 2048 bytes
        assert tracker.current == 4096 + 2048
        del a
        assert tracker.current == 2048
        c = torch.empty(10, dtype=torch.uint8)  # 10 bytes: one 512-byte block
        assert tracker.current == 2048 + 512
        del b, c
    assert tracker.current == 0
    assert tracker.peak == 4096 + 2048


def test_a_view_shares_its_storage_and_an_in_place_op_allocates_nothing():
    with MemoryTracker("cpu") as tracker:
        base = torch.zeros(16, 16)  # 1024 bytes
        views = [base.view(256), base.t(), base[2:5], base.transpose(0, 1)[::2]]
        base.add_(1.0)
        views[0].mul_(2.0)
        assert tracker.current == 1024
        del base
        assert tracker.current == 1024  # the views keep the storage alive
        del views
        assert tracker.current == 0


def test_registered_tensors_count_and_other_devices_do_not():
    before = torch.empty(128)  # 512 bytes, made before the tracker
    tracker = MemoryTracker("cpu")
    with tracker:
        tracker.register([before, before[:64], torch.empty(4, device="meta")])
        assert tracker.current == 512
        torch.empty(1000, device="meta")  # not on the tracked device
        assert tracker.current == 512


def test_the_breakdown_at_the_peak_has_each_category():
    """Weights trained (fp32) and frozen (fp16), gradients, SGD's momentum buffers and the input, each known exactly."""
    torch.manual_seed(0)
    trained = torch.nn.Linear(64, 64)  # 64*64*4 = 16384 bytes and 64*4 = 256 -> 512: 16896 bytes
    frozen = torch.nn.Linear(32, 32).half().requires_grad_(False)  # 32*32*2 = 2048 and 64 -> 512: 2560 bytes
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    tracker = MemoryTracker("cpu").watch([trained, frozen], [optimizer])
    tracker.register([*trained.parameters(), *frozen.parameters()])
    with tracker:
        x = torch.randn(8, 64)  # 2048 bytes, alive to the end
        trained(x).pow(2).sum().backward()
        optimizer.step()  # momentum buffers: a copy of each gradient
        optimizer.zero_grad(set_to_none=True)
    weights = 16896
    assert tracker.breakdown["weights, trained (fp32)"] == weights
    assert tracker.breakdown["weights, frozen (fp16)"] == 2560
    assert tracker.breakdown[GRADIENTS] == weights
    assert tracker.breakdown[OPTIMIZER_STATES] == weights
    assert tracker.breakdown[ACTIVATIONS] == 2048  # the peak is in the step: only the input is left of the rest
    assert sum(tracker.breakdown.values()) == tracker.peak == 3 * weights + 2560 + 2048


# ------------------------------------------------------------------------------------------------ CPU agreement

# The configurations of the CPU agreement test, as changes to the base settings (prior preservation on, text encoder
# frozen with cached embeddings, fp32, no checkpointing).  Extend this list as trainer options land.
AGREEMENT_CONFIGURATIONS = {
    "default": {},
    "prior-off": {"with_prior_preservation": False},
    "text-trained": {"train_text_encoder": True},
    "checkpointing": {"gradient_checkpointing": True},
    "bf16": {"mixed_precision": "bf16"},
    "text-trained-checkpointing-bf16": {
        "train_text_encoder": True,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
    },
    "text-frozen-uncached": {"cache_latents": False},
    "adamw-8bit": {"optimizer": "adamw_8bit"},
    "prodigy": {"optimizer": "prodigy", "learning_rate": 1.0},
    "adafactor": {"optimizer": "adafactor"},
    "lion": {"optimizer": "lion"},
    "lion-8bit": {"optimizer": "lion_8bit"},
    "schedule-free": {"optimizer": "adamw_schedule_free"},
    "loss-and-noise-options": {
        "noise_offset": 0.1,
        "noise_offset_random_strength": True,
        "input_perturbation": 0.1,
        "min_snr_gamma": 5.0,
        "debiased_estimation": True,
        "loss_type": "huber",
        "zero_terminal_snr": True,
        "min_timestep": 100,
    },
    "fused-backward": {"fused_backward": True},
    "full-bf16": {"full_bf16": True, "mixed_precision": "bf16"},
    "fused-full-bf16-text-trained-checkpointing": {
        "fused_backward": True,
        "full_bf16": True,
        "mixed_precision": "bf16",
        "train_text_encoder": True,
        "gradient_checkpointing": True,
    },
    "fit-preset-8bit-fused-full-bf16": {  # what Fit my GPU picks for SD 1.5 on a small card
        "optimizer": "adamw_8bit",
        "fused_backward": True,
        "full_bf16": True,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
    },
    # LoRA / LoHa / LoKr: the frozen model in the run's dtype, the adapter's weights, gradients and states
    "lora-text-conv-checkpointing-bf16": {
        "training_method": "lora",
        "network_train_text_encoder": True,
        "network_conv_rank": 4,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
    },
    "loha-conv": {"training_method": "loha", "network_conv_rank": 4},
    "lokr-fused-full-bf16": {
        "training_method": "lokr",
        "fused_backward": True,
        "full_bf16": True,
        "mixed_precision": "bf16",
    },
}
SCALES = {"bench-tiny": 64, "bench-small": 128, "bench-tiny-sdxl": 64}


def check_agreement(scale: str, changes: dict, work: Path) -> None:
    from dreambooth.models.tiny import tiny_components

    missing = [name for name in changes if name not in Settings.__dataclass_fields__]
    if missing:  # a trainer option not merged yet: the configuration runs once it is
        pytest.skip(f"no setting {', '.join(missing)} in this tree")
    settings = agreement_settings(work, SCALES[scale], **changes)
    estimated = estimate(settings, bench_architecture(scale), device_type="cpu")
    torch.manual_seed(0)
    components = tiny_components(bench_architecture(scale), seed=0)
    trainer = TrackedTrainer(settings, components=components, final_save=False, check_model_path=False)
    trainer.run()
    real = trainer.tracker
    assert abs(estimated.peak_bytes - real.peak) <= 0.03 * real.peak, (estimated.breakdown, real.breakdown)
    for label in ("weights, trained (fp32)", GRADIENTS):
        assert estimated.breakdown.get(label) == real.breakdown.get(label), label
    # bitsandbytes' two shared 1 KiB quantisation maps are made outside the tracked steps in both
    assert abs(real.breakdown.get(OPTIMIZER_STATES, 0) - estimated.breakdown.get(OPTIMIZER_STATES, 0)) <= 2048


@pytest.mark.parametrize("name", list(AGREEMENT_CONFIGURATIONS))
def test_the_estimate_agrees_with_a_real_cpu_run_at_bench_tiny(name, tmp_path):
    check_agreement("bench-tiny", AGREEMENT_CONFIGURATIONS[name], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "default",
        "prior-off",
        "text-trained-checkpointing-bf16",
        "fused-full-bf16-text-trained-checkpointing",
        "fit-preset-8bit-fused-full-bf16",
    ],
)
def test_the_estimate_agrees_with_a_real_cpu_run_at_bench_small(name, tmp_path):
    check_agreement("bench-small", AGREEMENT_CONFIGURATIONS[name], tmp_path)


# ------------------------------------------------------------------------------------------------ the estimate


def test_frozen_modules_are_counted_where_and_in_the_dtype_the_trainer_places_them():
    """On a GPU a module whose outputs are cached waits on the CPU; the VAE of a run without latent caching is on the
    GPU, in the mixed-precision dtype when there is one.  On the CPU everything is on the device."""
    from dreambooth.models.components import _on_meta, build_text_encoder, build_vae

    arch = bench_architecture("bench-tiny")

    def size(build, element_bytes):  # tensors rounded up to 512-byte blocks, as the tracker counts them
        module = _on_meta(lambda: build(arch))
        return sum(-(-p.numel() * element_bytes // 512) * 512 for p in module.parameters())

    base = Settings(pretrained_model_name_or_path="x", resolution=64)
    cached = estimate(base, arch)
    uncached = estimate(dataclasses.replace(base, cache_latents=False), arch)
    uncached_bf16 = estimate(dataclasses.replace(base, cache_latents=False, mixed_precision="bf16"), arch)
    on_cpu = estimate(base, arch, device_type="cpu")
    assert not [label for label in cached.breakdown if label.startswith("weights, frozen")]
    assert uncached.breakdown["weights, frozen (fp32)"] == size(build_vae, 4)
    assert uncached_bf16.breakdown["weights, frozen (bf16)"] == size(build_vae, 2)
    assert on_cpu.breakdown["weights, frozen (fp32)"] == size(build_vae, 4) + size(build_text_encoder, 4)
    assert "CUDA context" in cached.constants and "CUDA context" not in on_cpu.constants


def test_fp16_runs_the_trainers_grad_scaler_in_the_dry_run():
    """fp16 trains on CUDA only, so there is no real CPU run to compare: the dry run steps through the GradScaler and
    holds the same weights, gradients and optimizer states as bf16."""
    arch = bench_architecture("bench-tiny")
    base = Settings(pretrained_model_name_or_path="x", resolution=64)
    fp16 = estimate(dataclasses.replace(base, mixed_precision="fp16"), arch)
    bf16 = estimate(dataclasses.replace(base, mixed_precision="bf16"), arch)
    assert fp16.breakdown["weights, trained (fp32)"] == bf16.breakdown["weights, trained (fp32)"] > 0
    # at the peak of the step; with CUDA's float32 normalisation (memory/cuda_autocast.py) this model's peak is at the
    # end of the forward pass, before any gradient exists, in both
    for label in (GRADIENTS, OPTIMIZER_STATES):
        assert fp16.breakdown.get(label) == bf16.breakdown.get(label)


def test_format_and_total():
    e = Estimate(
        peak_bytes=3 * 2**30,
        breakdown={"weights, trained (fp32)": 2**31, ACTIVATIONS: 2**30},
        constants={"CUDA context": 2**29, "gradient exchange bucket": 2**29},
        arch_name="SD 1.x",
        seconds=1.5,
    )
    assert e.total_bytes == 4 * 2**30
    text = format_estimate(e)
    assert "weights, trained (fp32)" in text and "2.00 GiB" in text and "SD 1.x" in text
    assert text.splitlines()[-1].split() == ["total", "4.00", "GiB"]


def test_several_processes_add_one_gradient_bucket():
    from dreambooth.train.distributed import BUCKET_BYTES

    arch = bench_architecture("bench-tiny")
    settings = Settings(pretrained_model_name_or_path="x", resolution=64)
    one, two = estimate(settings, arch), estimate(settings, arch, processes=2)
    assert two.constants["gradient exchange bucket"] == BUCKET_BYTES
    assert two.peak_bytes == one.peak_bytes


def test_a_missing_model_is_one_sentence(tmp_path):
    from dreambooth.errors import ModelFileError

    with pytest.raises(ModelFileError, match="no such file or folder"):
        estimate(Settings(pretrained_model_name_or_path=str(tmp_path / "none.safetensors")))
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelFileError, match="not a readable safetensors file"):
        architecture_of(broken)


# ------------------------------------------------------------------------------------------------ full-size files


def write_sparse_sd15(folder: Path) -> tuple[Path, Path]:
    """A full-size SD 1.5-architecture .safetensors and .ckpt with the real key names and shapes, written sparse:
    the headers are real, the tensor bytes are holes, so no GB are written."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dreambooth.models.components import (
        Components,
        _on_meta,
        build_text_encoder,
        build_unet,
        build_vae,
        to_original_state_dict,
    )

    arch = ARCH_SHORTCUTS["sd15"]
    components = Components(
        unet=_on_meta(lambda: build_unet(arch)),
        vae=_on_meta(lambda: build_vae(arch)),
        text_encoder=_on_meta(lambda: build_text_encoder(arch)),
        tokenizer=None,
        noise_scheduler=None,
        arch=arch,
    )
    state = to_original_state_dict(components)  # meta tensors (and CLIP's position ids)
    dtypes = {torch.float32: "F32", torch.int64: "I64"}
    header, offset = {}, 0
    for key, tensor in state.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": dtypes[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    single = folder / "sd15-sized.safetensors"
    with single.open("wb") as handle:
        handle.write(len(raw).to_bytes(8, "little"))
        handle.write(raw)
        handle.truncate(8 + len(raw) + offset)
    pickled = folder / "sd15-sized.ckpt"
    with FakeTensorMode():
        fake = {k: torch.empty(v.shape, dtype=v.dtype) for k, v in state.items()}
    with torch.serialization.skip_data(materialize_fake_tensors=True):  # storages as holes of their full size
        torch.save({"state_dict": fake}, pickled)
    return single, pickled


MEASURE = """
import json, resource, sys, time
from dreambooth.memory.estimate import estimate
from dreambooth.settings import Settings
import diffusers, transformers  # what any estimate imports, measured before
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

def read_chars():
    return int(next(l for l in open("/proc/self/io") if l.startswith("rchar")).split()[1])

rss, chars, started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, read_chars(), time.perf_counter()
result = estimate(Settings(pretrained_model_name_or_path=sys.argv[1], resolution=512))
print(json.dumps({
    "seconds": time.perf_counter() - started,
    "rss_growth": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss) * 1024,
    "read": read_chars() - chars,
    "arch": result.arch_name,
    "peak": result.peak_bytes,
}))
"""


@pytest.mark.slow
def test_a_full_size_checkpoint_estimates_in_seconds_without_reading_its_tensors(tmp_path):
    """Peak RSS grows by under 256 MiB and under 64 MiB are read, for a 4 GiB file (.safetensors and .ckpt)."""
    single, pickled = write_sparse_sd15(tmp_path)
    assert single.stat().st_size > 3.9 * 2**30 and pickled.stat().st_size > 3.9 * 2**30
    assert architecture_of(single).unet == ARCH_SHORTCUTS["sd15"].unet  # the shortcut is the real layout
    assert architecture_of(single).text == ARCH_SHORTCUTS["sd15"].text
    assert architecture_of(pickled).vae == ARCH_SHORTCUTS["sd15"].vae
    root = Path(__file__).resolve().parents[1]
    for path in (single, pickled):
        output = subprocess.run(
            [sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, cwd=root, timeout=600
        )
        assert output.returncode == 0, output.stderr[-2000:]
        measured = json.loads(output.stdout.strip().splitlines()[-1])
        assert measured["arch"] == "SD 1.x"
        assert measured["rss_growth"] < 256 * 2**20, measured
        assert measured["read"] < 64 * 2**20, measured
        assert measured["seconds"] < 120, measured  # about 7 s on a busy 2-core machine
        assert measured["peak"] > 10 * 2**30  # fp32 AdamW: weights, gradients, two states of 0.86 G parameters


def test_the_estimate_covers_8bit_adamw():
    arch = bench_architecture("bench-tiny")
    base = Settings(pretrained_model_name_or_path="x", resolution=64)
    adamw = estimate(base, arch)
    eight_bit = estimate(dataclasses.replace(base, optimizer="adamw_8bit"), arch)
    assert adamw.breakdown[OPTIMIZER_STATES] >= 2 * adamw.breakdown["weights, trained (fp32)"]  # 2 x fp32
    # two bytes per weight, but fp32 for the many small tensors of this tiny model
    assert eight_bit.breakdown[OPTIMIZER_STATES] < 0.4 * adamw.breakdown[OPTIMIZER_STATES]


def test_the_estimate_counts_each_optimizers_states():
    """Prodigy keeps four fp32 tensors per weight (two moments, its s and the initial weights), schedule-free AdamW
    two (z and the second moment), Lion one, Adafactor less than one (its second moments factored over the last two
    dimensions of each matrix and kernel)."""
    arch = bench_architecture("bench-tiny")
    base = Settings(pretrained_model_name_or_path="x", resolution=64)
    weights = estimate(base, arch).breakdown["weights, trained (fp32)"]

    def states(optimizer):
        return estimate(dataclasses.replace(base, optimizer=optimizer), arch).breakdown.get(OPTIMIZER_STATES, 0)

    assert states("prodigy") == pytest.approx(4 * weights, rel=0.01)
    assert states("adamw_schedule_free") == pytest.approx(2 * weights, rel=0.01)
    assert states("lion") == pytest.approx(weights, rel=0.01)
    assert 0 < states("adafactor") < 0.7 * weights


@pytest.mark.parametrize("variant", ["sd1", "sd2-v", "sd1-inpainting"])
def test_the_architecture_is_read_without_the_tensors_as_loading_reads_it(tiny_checkpoint, tmp_path, variant):
    """From a single file (header and sidecar yaml only) and from a diffusers folder (its configs)."""
    from dreambooth.models.components import load_components, save_diffusers_folder

    path = tiny_checkpoint(variant)
    loaded = load_components(path)
    read = architecture_of(path)
    assert (read.unet, read.vae, read.text, read.prediction_type) == (
        loaded.arch.unet,
        loaded.arch.vae,
        loaded.arch.text,
        loaded.arch.prediction_type,
    )
    folder = save_diffusers_folder(loaded, tmp_path / "folder")
    assert architecture_of(folder).unet == loaded.arch.unet


def test_an_inpainting_model_is_refused_with_a_sentence():
    from dreambooth.errors import DreamBoothError
    from dreambooth.models.tiny import tiny_architecture

    with pytest.raises(DreamBoothError, match="does not cover inpainting models"):
        estimate(Settings(pretrained_model_name_or_path="x", resolution=64), tiny_architecture("sd1", inpainting=True))
