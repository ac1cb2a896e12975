"""The memory estimate for SDXL: the released model's layout on the meta device (two text encoders), the placement of
its parts (both encoders' embeddings cached, the VAE in fp32), agreement with a real CPU run of the tiny SDXL, and the
targets of DESIGN.md §6 at 1024 px, batch 1: a full fine-tune under 12 GiB with the fit preset, LoRA rank 16 under
7 GiB."""

from __future__ import annotations

import pytest
from test_memory import check_agreement

from dreambooth.bench import BENCH_TINY_SDXL, bench_architecture
from dreambooth.memory.dryrun import TEXT_CACHE_LABEL
from dreambooth.memory.estimate import ARCH_SHORTCUTS, estimate
from dreambooth.memory.tracker import GRADIENTS
from dreambooth.models.components import _on_meta, build_text_encoder, build_text_encoder_2, build_unet, build_vae
from dreambooth.settings import Settings

GIB = 2**30
SDXL = ARCH_SHORTCUTS["sdxl"]


def _bytes(build, arch, element_bytes):
    """A module's weights as the tracker counts them: each tensor rounded up to 512-byte blocks."""
    module = _on_meta(lambda: build(arch))
    return sum(-(-p.numel() * element_bytes // 512) * 512 for p in module.parameters())


def test_the_sdxl_shortcut_is_the_released_model():
    """SDXL base 1.0's parameter counts (its diffusers folder): the UNet, the VAE, CLIP ViT-L and OpenCLIP bigG."""
    counts = [
        sum(p.numel() for p in _on_meta(lambda b=b: b(SDXL)).parameters())
        for b in (build_unet, build_vae, build_text_encoder, build_text_encoder_2)
    ]
    assert counts == [2_567_463_684, 83_653_863, 123_060_480, 694_659_840]
    assert SDXL.is_sdxl and SDXL.name == "SDXL"


# ------------------------------------------------------------------------------------------------ the tiny SDXL


def test_both_text_encoders_are_built_cached_and_wait_off_the_gpu():
    arch = bench_architecture(BENCH_TINY_SDXL)
    base = Settings(pretrained_model_name_or_path="x", resolution=64)
    on_gpu = estimate(base, arch)
    assert not [label for label in on_gpu.breakdown if label.startswith("weights, frozen")]  # all cached: off it
    hidden = 77 * (arch.text["hidden_size"] + arch.text_2["hidden_size"]) * 4  # both encoders' states, fp32
    pooled = arch.text_2["projection_dim"] * 4
    assert hidden + pooled <= on_gpu.breakdown[TEXT_CACHE_LABEL] < 64 * 2**10
    on_cpu = estimate(base, arch, device_type="cpu")  # nothing leaves the device: every module counted
    modules = sum(_bytes(b, arch, 4) for b in (build_vae, build_text_encoder, build_text_encoder_2))
    assert on_cpu.breakdown["weights, frozen (fp32)"] == modules


def test_the_sdxl_vae_stays_fp32_in_a_bf16_run():
    """Without cached latents the VAE encodes every step on the GPU: SDXL's in fp32 (it overflows in half precision),
    where SD's takes the mixed-precision dtype."""
    arch = bench_architecture(BENCH_TINY_SDXL)
    settings = Settings(pretrained_model_name_or_path="x", resolution=64, cache_latents=False, mixed_precision="bf16")
    breakdown = estimate(settings, arch).breakdown
    assert breakdown["weights, frozen (fp32)"] == _bytes(build_vae, arch, 4)
    assert "weights, frozen (bf16)" not in breakdown


SDXL_AGREEMENT = {
    "default": {},
    "text-frozen-uncached": {"cache_latents": False},
    "text-trained-checkpointing-bf16": {
        "train_text_encoder": True,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
    },
    "fit-preset": {
        "optimizer": "adamw_8bit",
        "fused_backward": True,
        "full_bf16": True,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
    },
    "lora-checkpointing-bf16": {"training_method": "lora", "gradient_checkpointing": True, "mixed_precision": "bf16"},
}


@pytest.mark.slow  # a 2-step tiny-SDXL run and its dry run each (2-3 min on the loaded 2-core machine)
@pytest.mark.parametrize("name", list(SDXL_AGREEMENT))
def test_the_estimate_agrees_with_a_real_cpu_run_of_the_tiny_sdxl(name, tmp_path):
    check_agreement(BENCH_TINY_SDXL, SDXL_AGREEMENT[name], tmp_path)


# ------------------------------------------------------------------------------------------------ the targets

FIT_PRESET = {  # what Fit my GPU turns on for SDXL on a 12 GiB card (the ladder's last rung that keeps what trains)
    "mixed_precision": "bf16",
    "optimizer": "adamw_8bit",
    "full_bf16": True,
    "fused_backward": True,
    "gradient_checkpointing": True,
}


@pytest.mark.slow  # a dry run of the full-size SDXL (about 2 min on the loaded 2-core machine)
def test_a_full_sdxl_fine_tune_at_1024_fits_12_gib_with_the_fit_preset():
    settings = Settings(pretrained_model_name_or_path="x", resolution=1024, train_batch_size=1, **FIT_PRESET)
    result = estimate(settings, SDXL)
    assert result.total_bytes < 12 * GIB, result.breakdown
    assert result.breakdown["weights, trained (bf16)"] == _bytes(build_unet, SDXL, 2)
    # the VAE and both text encoders wait on the CPU (latents and embeddings cached)
    assert not [label for label in result.breakdown if label.startswith("weights, frozen")]
    assert result.breakdown.get(GRADIENTS, 0) < 0.1 * GIB  # fused backward: one parameter's gradient at a time


@pytest.mark.slow  # a dry run of the full-size SDXL (about 2 min on the loaded 2-core machine)
def test_sdxl_lora_rank_16_at_1024_fits_7_gib():
    settings = Settings(
        pretrained_model_name_or_path="x",
        resolution=1024,
        train_batch_size=1,
        training_method="lora",
        network_rank=16,
        gradient_checkpointing=True,
        mixed_precision="bf16",
    )
    result = estimate(settings, SDXL)
    assert result.total_bytes < 7 * GIB, result.breakdown
    assert result.breakdown["weights, frozen (bf16)"] == _bytes(build_unet, SDXL, 2)  # the UNet only: the rest cached
