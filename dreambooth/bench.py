"""``python -m dreambooth bench``: seconds per step, the split of a step, and peak memory.  Not a test.

For each scale and configuration three things are measured, each in its own process (so peak memory is its own):

* **default** -- our trainer as a user runs it (cached latents, cached text embeddings when the text encoder is
  frozen, fused AdamW when available);
* **naive**   -- the same trainer with no latent or embedding cache: VAE and text encoder run every step, as
  diffusers' ``examples/dreambooth/train_dreambooth.py`` does;
* **floor**   -- the bare forward + backward + gradient clipping + optimizer step of the trained modules on tensors
  made once (no data loading, no VAE; the text encoder only when it is trained), with the trainer's own optimizer
  (the same implementation as *default* and *naive*: fused AdamW when available).

With ``--reference SCRIPT`` a fourth row, **diffusers-script**, runs diffusers' ``train_dreambooth.py`` itself,
unmodified, on the same model, images and options (see ``bench_reference``; it needs torchvision: ``.venv-ref``).

``--training-method lora`` measures LoRA training instead of full fine-tuning: our trainer with ``training_method
lora``, rank ``--network-rank``, alpha = rank and one learning rate (what diffusers' ``train_dreambooth_lora.py``,
the reference script then, can be told; ``bench_reference`` lists what it cannot); modes *default* and *naive* (no
*floor*: bare adapter steps would need the adapter code outside the trainer).  Every row says how many parameters
its optimizer steps (``params``), so that adapting different layers than the reference shows.

Seconds per step is the median of the steady-state steps (the first ``--warmup`` are dropped); configurations are
interleaved and repeated (``--repeats``), and the median over repeats is reported.

Memory, per row, beside the process's peak RSS (``peak GiB``, read right after the timed steps):

* ``est. MiB`` -- the memory estimate (``memory.estimate.estimate`` with ``device_type="cpu"``: nothing leaves the
  device) of the row's own settings and the trainer's flags (``cache_text=False`` for *naive*); none for *floor*;
* ``tracked MiB`` -- the peak of live tensor bytes that the estimate's :class:`~.memory.tracker.MemoryTracker`
  counts around real steps (``memory.dryrun.TrackedTrainer``, as the CPU agreement test in
  ``tests/test_memory.py`` does; for *floor* the tracker around its bare steps, counting the trained modules, the
  tensors made once, the optimizer states and all the steps allocate).

The tracker sees every operator and slows it, so it is never around the timed steps: after the timed run, in the
same ``--one`` process, a separate short pass of :data:`TRACKED_STEPS` steps is tracked (*default* / *naive*: a new
trainer of the same settings on new components of the same seed; *floor*: two more bare steps), then the estimate
runs.  Both come after the peak RSS is read, so they do not change it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SCALES = {
    "tiny64": ("bench-tiny", 64),
    "tiny128": ("bench-tiny", 128),
    "small128": ("bench-small", 128),
    "sd15-256": ("sd15", 256),
    "tiny-sdxl128": ("bench-tiny-sdxl", 128),
    "tiny-sdxl256": ("bench-tiny-sdxl", 256),
}
DEFAULT_SCALES = ["tiny64", "tiny128", "small128"]
INSTANCE_PROMPT, CLASS_PROMPT = "photo of zwx ring", "photo of a ring"
TRACKED_STEPS = 2  # the steps of the tracked pass: the optimizer makes its states in the first, the second is steady
MIB = 2**20


# name: (UNet channels, which UNet levels have cross-attention, context dim, UNet layers per block,
#        VAE channels, VAE layers per block, text (hidden, intermediate, layers, heads))
BENCH_MODELS = {
    "bench-tiny": ([32, 64], [True, False], 32, 2, [32, 64], 1, (32, 128, 2, 4)),
    "bench-small": ([64, 128, 256], [True, True, False], 256, 2, [64, 128, 256], 2, (256, 1024, 4, 4)),
    "sd15": ([320, 640, 1280, 1280], [True, True, True, False], 768, 2, [128, 256, 512, 512], 2, (768, 3072, 12, 12)),
}


BENCH_TINY_SDXL = "bench-tiny-sdxl"  # the tests' tiny SDXL (models/tiny.py): SDXL's shape, two text encoders


def bench_architecture(model: str) -> Any:
    """The architecture of a benchmark model (random weights are made from it)."""
    from .models.tiny import tiny_architecture

    if model == BENCH_TINY_SDXL:
        return tiny_architecture("sdxl")
    if model not in BENCH_MODELS:
        raise ValueError(f"unknown bench model {model!r}")
    unet_channels, attention, context, unet_layers, vae_channels, vae_layers, text = BENCH_MODELS[model]
    arch = tiny_architecture("sd1")
    arch.unet.update(
        block_out_channels=unet_channels,
        layers_per_block=unet_layers,
        cross_attention_dim=context,
        attention_head_dim=8,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
    )
    arch.vae.update(
        block_out_channels=vae_channels,
        layers_per_block=vae_layers,
        down_block_types=["DownEncoderBlock2D"] * len(vae_channels),
        up_block_types=["UpDecoderBlock2D"] * len(vae_channels),
    )
    hidden, inner, layers, heads = text
    arch.text.update(hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers, num_attention_heads=heads)
    arch.text_blocks_in_file = layers
    return arch


def _dataset(root: Path, resolution: int) -> tuple[Path, Path]:
    from .demo import draw_instance_images

    instance, prior = root / "instance", root / "class"
    draw_instance_images(instance, count=4, size=resolution, seed=1)
    draw_instance_images(prior, count=4, size=resolution, seed=2)
    return instance, prior


def measure_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this process: spec = {scale, mode, prior, train_text, steps, warmup, batch}, for LoRA
    also {method: "lora", rank, learning_rate}.  The row also says how many parameters the first optimizer that
    steps (the timed run's) trains: ``trained_parameters``."""
    import torch
    from torch.optim.optimizer import register_optimizer_step_post_hook

    from .bench_lora import check_mode, lora_targets
    from .bench_reference import trained_parameters
    from .models.tiny import tiny_components

    check_mode(spec)
    torch.manual_seed(0)
    model, resolution = SCALES[spec["scale"]]
    arch = bench_architecture(model)
    if arch.is_sdxl and spec["mode"].startswith("floor"):  # its bare step has no SDXL conditioning
        raise ValueError(f"bench mode floor does not exist for the SDXL scale {spec['scale']} (default and naive do)")
    components = tiny_components(arch, seed=0)
    trained: list[int] = []

    def count(optimizer: Any, args: Any, kwargs: Any) -> None:
        if not trained:
            trained.append(trained_parameters(optimizer))

    handle = register_optimizer_step_post_hook(count)
    try:
        if spec["mode"].startswith("floor"):
            row = _floor(components, spec, resolution)
        else:
            # removed also when the run fails
            with tempfile.TemporaryDirectory(prefix="dreambooth-bench-") as temp, lora_targets(spec):
                row = _measure_trainer(components, arch, spec, resolution, Path(temp))
    finally:
        handle.remove()
    method = {"method": spec.get("method", "full"), **{key: spec[key] for key in ("rank", "targets") if key in spec}}
    return {**row, **method, "trained_parameters": trained[0] if trained else None}


def _measure_trainer(components: Any, arch: Any, spec: dict[str, Any], resolution: int, work: Path) -> dict[str, Any]:
    """Our trainer (modes default and naive) on images drawn under ``work``: the timed run, then its memory (a
    tracked pass of :data:`TRACKED_STEPS` steps and the estimate of the same settings)."""
    import dataclasses

    import torch

    from .bench_lora import lora_settings
    from .memory.dryrun import TrackedTrainer
    from .memory.estimate import estimate
    from .models.tiny import tiny_components
    from .settings import Concept, Settings
    from .train.loop import Trainer, peak_memory_gib

    instance, prior = _dataset(work, resolution)
    lora = lora_settings(spec)
    settings = Settings(
        pretrained_model_name_or_path="in-memory",
        output_dir=str(work / "out"),
        resolution=resolution,
        train_batch_size=spec["batch"],
        max_train_steps=spec["steps"],
        center_crop=True,
        with_prior_preservation=spec["prior"],
        train_text_encoder=lora.pop("train_text_encoder", spec["train_text"]),
        cache_latents=spec["mode"] == "default",
        n_save_sample=0,
        save_training_state=False,
        device="cpu",
        concepts=[
            Concept(
                instance_data_dir=str(instance),
                instance_prompt=INSTANCE_PROMPT,
                class_data_dir=str(prior),
                class_prompt=CLASS_PROMPT,
            )
        ],
        num_class_images=4,
        **lora,
    )
    flags = {"cache_text": spec["mode"] == "default", "final_save": False, "check_model_path": False}
    trainer = Trainer(settings, components=components, **flags)
    result = trainer.run()
    steady = result.step_seconds[spec["warmup"] :]
    steps = len(result.step_seconds)
    measured = {
        "seconds_per_step": statistics.median(steady),
        "data": trainer.timings["data"] / steps,
        "forward_backward": trainer.timings["forward_backward"] / steps,
        "optimizer": trainer.timings["optimizer"] / steps,
        "peak_memory_gib": peak_memory_gib(torch.device("cpu")),  # before the passes below
    }
    del trainer, components
    torch.manual_seed(0)
    tracked = TrackedTrainer(
        dataclasses.replace(settings, max_train_steps=TRACKED_STEPS), components=tiny_components(arch, seed=0), **flags
    )
    tracked.run()
    estimated = estimate(settings, arch, device_type="cpu", cache_text=flags["cache_text"])
    return {**measured, "estimate_mib": estimated.peak_bytes / MIB, "tracked_mib": tracked.tracker.peak / MIB}


def _floor(components: Any, spec: dict[str, Any], resolution: int) -> dict[str, Any]:
    """Forward + backward + clipping + an optimizer step on tensors made once; then :data:`TRACKED_STEPS` more
    inside a :class:`~.memory.tracker.MemoryTracker` (its peak: ``tracked_mib``; no estimate: ``estimate_mib`` None).

    The optimizer is the trainer's own (``make_optimizer`` with the default settings: fused AdamW where this torch
    and device support it), over the same parameter groups, so that *default / floor* measures the trainer's
    overhead and not a difference of optimizer implementations.
    """
    import torch

    from .memory.tracker import MemoryTracker
    from .settings import Settings
    from .train.loop import peak_memory_gib
    from .train.optim import make_optimizer
    from .train.sampling import encode_prompts

    settings = Settings()
    unet, text_encoder = components.unet, components.text_encoder
    unet.requires_grad_(True).train()
    groups = [{"params": list(unet.parameters()), "lr": settings.learning_rate}]
    if spec["train_text"]:
        text_encoder.requires_grad_(True).train()
        groups.append({"params": list(text_encoder.parameters()), "lr": settings.text_encoder_lr()})
    params = [p for group in groups for p in group["params"]]
    optimizer = make_optimizer(groups, settings, torch.device("cpu"))
    count = spec["batch"] * (2 if spec["prior"] else 1)
    scale = 2 ** (len(components.vae.config.block_out_channels) - 1)
    latents = torch.randn(count, 4, resolution // scale, resolution // scale)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (count,))
    noisy = components.noise_scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        hidden = encode_prompts(text_encoder, components.tokenizer, [INSTANCE_PROMPT] * count)

    def step() -> None:
        nonlocal hidden
        if spec["train_text"]:
            hidden = encode_prompts(text_encoder, components.tokenizer, [INSTANCE_PROMPT] * count)
        prediction = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times = []
    for _ in range(spec["steps"]):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    measured = {
        "seconds_per_step": statistics.median(times[spec["warmup"] :]),
        "peak_memory_gib": peak_memory_gib(torch.device("cpu")),  # before the tracked pass
    }
    # What the bare steps hold: the trained modules, the tensors made once and the optimizer states (made in the
    # timed steps), and all that the steps allocate.  The VAE and a frozen text encoder take no part in them.
    modules = [unet, text_encoder] if spec["train_text"] else [unet]
    tracker = MemoryTracker("cpu").watch(modules, [optimizer])
    for module in modules:
        tracker.register([*module.parameters(), *module.buffers()])
    states = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    tracker.register([*states, latents, noise, timesteps, noisy, hidden])
    with tracker:
        for _ in range(TRACKED_STEPS):
            step()
    return {**measured, "estimate_mib": None, "tracked_mib": tracker.peak / MIB}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--scales",
        nargs="+",
        default=DEFAULT_SCALES,
        choices=sorted(SCALES),
        help=f"model scales (default: {' '.join(DEFAULT_SCALES)}; sd15-256 is slow)",
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=["default", "naive", "floor"],
        help="what is measured (default: default naive floor; with --training-method lora: default naive)",
    )
    parser.add_argument("--steps", type=int, default=25, help="steps per measurement (default 25)")
    parser.add_argument("--warmup", type=int, default=5, help="first steps left out of the median (default 5)")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved repeats (default 2)")
    parser.add_argument("--prior", choices=["on", "off", "both"], default="both")
    parser.add_argument("--text", choices=["frozen", "trained", "both"], default="frozen")
    from .bench_lora import add_lora_arguments

    add_lora_arguments(parser)
    parser.add_argument(
        "--reference",
        metavar="SCRIPT",
        help="also run diffusers' examples/dreambooth/train_dreambooth.py (train_dreambooth_lora.py with "
        "--training-method lora), unmodified, on each configuration",
    )
    parser.add_argument("--json", help="also write the results as JSON here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one measurement (JSON spec)


def run_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.one:
        print(json.dumps(measure_one(json.loads(args.one))))
        return []
    priors = {"on": [True], "off": [False], "both": [False, True]}[args.prior]
    texts = {"frozen": [False], "trained": [True], "both": [False, True]}[args.text]
    from .bench_lora import LORA_MODES, method_config

    method = method_config(args)
    modes = args.modes or (list(LORA_MODES) if method else ["default", "naive", "floor"])
    configs = [
        {
            **method,
            "scale": scale,
            "prior": prior,
            "train_text": text,
            "batch": 1,
            "steps": max(args.steps if not scale.startswith("sd15") else 4, args.warmup + 3),
            "warmup": args.warmup if not scale.startswith("sd15") else 1,
        }
        for scale in args.scales
        for prior in priors
        for text in texts
    ]
    results: dict[tuple, list[dict[str, Any]]] = {}
    reference_work = Path(tempfile.mkdtemp(prefix="dreambooth-bench-reference-")) if args.reference else None
    try:
        for repeat in range(args.repeats):
            for config in configs:
                if reference_work is not None:
                    from .bench_reference import measure_reference

                    measured = measure_reference(args.reference, config, reference_work)
                    key = (config["scale"], config["prior"], config["train_text"], measured["mode"])
                    results.setdefault(key, []).append(measured)
                    print(f"  repeat {repeat + 1}: {key}: {measured['seconds_per_step']:.3f} s/step", flush=True)
                for mode in modes:
                    spec = {**config, "mode": mode}
                    output = subprocess.run(
                        [sys.executable, "-m", "dreambooth", "bench", "--one", json.dumps(spec)],
                        capture_output=True,
                        text=True,
                        check=False,
                    )
                    if output.returncode != 0:
                        raise RuntimeError(f"bench run {spec} failed:\n{output.stderr[-3000:]}")
                    measured = json.loads(output.stdout.strip().splitlines()[-1])
                    key = (config["scale"], config["prior"], config["train_text"], mode)
                    results.setdefault(key, []).append(measured)
                    print(f"  repeat {repeat + 1}: {key}: {measured['seconds_per_step']:.3f} s/step", flush=True)
    finally:
        if reference_work is not None:
            shutil.rmtree(reference_work, ignore_errors=True)
    rows = median_rows(results)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return rows


def median_rows(results: dict[tuple, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per (scale, prior, train_text, mode): each measured field's median over the repeats (None where no
    repeat has it: the floor's estimate); a text field (the training method) as the repeats give it."""
    rows = []
    for (scale, prior, text, mode), runs in results.items():
        row = {"scale": scale, "prior": prior, "train_text": text, "mode": mode}
        for field in runs[0]:
            if field not in row:
                values = [r[field] for r in runs if r.get(field) is not None]
                if values and isinstance(values[0], str):
                    if len(set(values)) > 1:
                        raise ValueError(f"the repeats of {(scale, prior, text, mode)} differ in {field}: {values}")
                    row[field] = values[0]
                else:
                    row[field] = statistics.median(values) if values else None
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    """The rows as a table, after a line that says the machine and what was trained."""
    import platform

    import torch

    from .bench_lora import describe_method

    method = ", ".join(sorted({describe_method(row) for row in rows}))
    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, fp32, batch 1 (+1 class image with prior); {method}"
    )
    header = (
        f"{'scale':<10} {'prior':<5} {'text':<7} {'mode':<16} {'params':>8} {'s/step':>7} {'data':>6} "
        f"{'fwd+bwd':>8} {'optim':>6} {'peak GiB':>8} {'est. MiB':>8} {'tracked MiB':>11} {'vs naive':>8} "
        f"{'vs floor':>8} {'vs script':>9}"
    )
    print(header)
    print("-" * len(header))
    index = {(r["scale"], r["prior"], r["train_text"], r["mode"]): r for r in rows}
    for row in rows:
        key = (row["scale"], row["prior"], row["train_text"])
        naive, floor = index.get((*key, "naive")), index.get((*key, "floor"))
        script = index.get((*key, "diffusers-script"))
        vs_naive = f"{naive['seconds_per_step'] / row['seconds_per_step']:.2f}x" if naive else ""
        vs_floor = f"{row['seconds_per_step'] / floor['seconds_per_step']:.2f}" if floor else ""
        vs_script = f"{script['seconds_per_step'] / row['seconds_per_step']:.2f}x" if script else ""
        split = "".join(
            f" {row[k]:>{w}.3f}" if k in row else " " * (w + 1)
            for k, w in (("data", 6), ("forward_backward", 8), ("optimizer", 6))
        )
        estimated = f"{row['estimate_mib']:.1f}" if row.get("estimate_mib") is not None else "—"
        tracked = f"{row['tracked_mib']:.1f}" if row.get("tracked_mib") is not None else "—"
        print(
            f"{row['scale']:<10} {'on' if row['prior'] else 'off':<5} "
            f"{'trained' if row['train_text'] else 'frozen':<7} {row['mode']:<16} "
            f"{_count(row.get('trained_parameters')):>8} {row['seconds_per_step']:>7.3f}{split} "
            f"{row['peak_memory_gib']:>8.2f} {estimated:>8} {tracked:>11} "
            f"{vs_naive:>8} {vs_floor:>8} {vs_script:>9}"
        )


def _count(parameters: float | None) -> str:
    """A parameter count for the table: 12.3k, 4.56M ("—" when the row has none)."""
    if parameters is None:
        return "—"
    if parameters >= 1e6:
        return f"{parameters / 1e6:.2f}M"
    return f"{parameters / 1e3:.1f}k" if parameters >= 1e3 else f"{int(parameters)}"
