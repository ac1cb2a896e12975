"""GPU figures for docs/benchmarks.md (not a test): our trainer's seconds per step (and steps per second) and the peak
of ``torch.cuda.max_memory_allocated`` over its steps, beside the memory estimate of the same settings.

Model: the SD 1.5 architecture (``--arch sd15``: the released UNet, VAE and CLIP text encoder shapes) with random
weights, built in this process (nothing is downloaded); ``--resolution`` px (default 512), batch 1 + 1 class image
(prior preservation), text encoder frozen with cached embeddings, cached latents, 4 instance + 4 class images drawn
here.  Each configuration trains ``--steps`` steps on its own freshly built model (same seed); seconds per step is
the median of the steps after the first ``--warmup``.  The peak statistics are reset when the steps begin (loading
and caching are not steps), as tests/test_gpu_estimate.py does.

Configurations: *default* (fp32); *default-tf32* (the same with TF32 matrix products allowed, which the trainer does
not do); *bf16* (bf16 mixed precision alone); the fit preset of a 6 GiB card (bf16 mixed precision, 8-bit AdamW, bf16
weights, fused backward) and of a 5 GiB card (the same + gradient checkpointing) -- what ``low_memory`` chooses for
those cards (docs/benchmarks.md's estimate table); *default + xformers* only where xformers is installed; and, where
this checkout has the LoRA trainer (a ``training_method`` setting), LoRA rank 16 plain and with bf16 + checkpointing.

``--device cpu --arch bench-tiny --resolution 64`` runs the same code on the CPU in seconds (a dry run of this
script; its figures mean nothing).  Usage (from the repository root):

    python tools/gpu_bench.py [--json FILE] [--configs NAME ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

GIB = 2**30
FIT_6GIB = {"mixed_precision": "bf16", "optimizer": "adamw_8bit", "full_bf16": True, "fused_backward": True}
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "default-tf32": {},  # + TF32 matrix products (MATMUL_PRECISION): what fp32 training would gain from allowing them
    "bf16": {"mixed_precision": "bf16"},
    "fit-preset-6gib": FIT_6GIB,
    "fit-preset-5gib": {**FIT_6GIB, "gradient_checkpointing": True},
    "default-xformers": {"attention": "xformers"},
    "lora-r16": {"training_method": "lora", "network_rank": 16},
    "lora-r16-checkpointing-bf16": {
        "training_method": "lora",
        "network_rank": 16,
        "gradient_checkpointing": True,
        "mixed_precision": "bf16",
    },
}

# torch.set_float32_matmul_precision per configuration ("highest", torch's default, for the others): the trainer
# itself leaves it at the default, so fp32 products run in full fp32 (no TF32) on the GPU.
MATMUL_PRECISION = {"default-tf32": "high"}


def why_not(changes: dict[str, Any], device: str) -> str | None:
    """Why a configuration cannot run here (None: it can)."""
    from dreambooth.settings import Settings

    fields = {f.name for f in dataclasses.fields(Settings)}
    missing = sorted(set(changes) - fields)
    if missing:
        return f"this checkout has no setting {', '.join(missing)} (the LoRA trainer has not landed)"
    if changes.get("optimizer") == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    if changes.get("attention") == "xformers" and importlib.util.find_spec("xformers") is None:
        return "xformers is not installed"
    if device == "cpu" and changes.get("attention") == "xformers":
        return "xformers needs CUDA"
    return None


def architecture(name: str) -> Any:
    from dreambooth.bench import BENCH_MODELS, bench_architecture
    from dreambooth.memory.estimate import ARCH_SHORTCUTS

    if name in ARCH_SHORTCUTS:
        return ARCH_SHORTCUTS[name]
    if name in BENCH_MODELS:
        return bench_architecture(name)
    raise SystemExit(f"--arch: unknown architecture {name!r} (one of {sorted({*ARCH_SHORTCUTS, *BENCH_MODELS})})")


def base_settings(work: Path, resolution: int, steps: int, device: str) -> Any:
    from dreambooth.demo import draw_instance_images
    from dreambooth.settings import Concept, Settings

    instance, prior = work / "instance", work / "class"
    if not instance.exists():
        draw_instance_images(instance, count=4, size=resolution, seed=1)
        draw_instance_images(prior, count=4, size=resolution, seed=2)
    return Settings(
        pretrained_model_name_or_path="in-memory",
        output_dir=str(work / "out"),
        resolution=resolution,
        max_train_steps=steps,
        center_crop=True,
        with_prior_preservation=True,
        num_class_images=4,
        n_save_sample=0,
        save_training_state=False,
        device=device,
        concepts=[
            Concept(
                instance_data_dir=str(instance),
                instance_prompt="photo of zwx ring",
                class_data_dir=str(prior),
                class_prompt="photo of a ring",
            )
        ],
    )


def measure(name: str, changes: dict[str, Any], arch: Any, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One configuration: its estimate, then a run of ``args.steps`` steps on a fresh model."""
    import torch

    from dreambooth.memory.estimate import estimate
    from dreambooth.models.tiny import tiny_components
    from dreambooth.train.loop import Trainer

    cuda = args.device == "cuda"

    class PeakOfSteps(Trainer):
        """The trainer, with the GPU's peak statistics reset when the steps begin."""

        def _steps(self, run: Any) -> None:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            super()._steps(run)
            if cuda:
                torch.cuda.synchronize()
            self.steps_wall = time.perf_counter() - started
            self.steps_peak = torch.cuda.max_memory_allocated() if cuda else None
            self.steps_reserved = torch.cuda.max_memory_reserved() if cuda else None

    settings = dataclasses.replace(base_settings(work, args.resolution, args.steps, args.device), **changes)
    row: dict[str, Any] = {"config": name, "changes": changes}
    started = time.perf_counter()
    try:  # the run's figures are wanted also where the estimate cannot do this configuration
        estimated = estimate(settings, arch, device_type=args.device)
    except Exception as error:
        traceback.print_exc()
        estimated, row["estimate_failed"] = None, f"{type(error).__name__}: {error}"[:300]
    else:
        row["estimate_seconds"] = time.perf_counter() - started
        row["estimate_peak_gib"] = estimated.peak_bytes / GIB
        row["estimate_total_gib"] = estimated.total_bytes / GIB
    torch.manual_seed(0)
    started = time.perf_counter()
    components = tiny_components(arch, seed=0)
    row["build_seconds"] = time.perf_counter() - started
    trainer = PeakOfSteps(settings, components=components, final_save=False, check_model_path=False)
    row["float32_matmul_precision"] = MATMUL_PRECISION.get(name, "highest")
    torch.set_float32_matmul_precision(row["float32_matmul_precision"])
    try:
        result = trainer.run()
    finally:
        torch.set_float32_matmul_precision("highest")
    steady = result.step_seconds[args.warmup :] or result.step_seconds
    seconds = statistics.median(steady)
    row.update(
        steps=len(result.step_seconds),
        seconds_per_step=seconds,
        steps_per_second=1 / seconds,
        first_step_seconds=result.step_seconds[0],
        steps_wall_seconds=trainer.steps_wall,
        losses_finite=all(torch.isfinite(torch.tensor(loss)) for _, loss in result.losses),
    )
    if cuda:
        row["max_memory_allocated_gib"] = trainer.steps_peak / GIB
        row["max_memory_reserved_gib"] = trainer.steps_reserved / GIB
        if estimated is not None:
            row["estimate_over_measured"] = estimated.peak_bytes / trainer.steps_peak
    del trainer, components, result
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def machine(device: str) -> dict[str, Any]:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__, "device": device}
    if device == "cuda":
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / GIB
    for module in ("diffusers", "transformers", "bitsandbytes", "xformers"):
        spec = importlib.util.find_spec(module)
        info[module] = __import__(module).__version__ if spec else None
    return info


def print_rows(rows: list[dict[str, Any]]) -> None:
    def number(row: dict[str, Any], key: str, digits: int) -> str:
        return "—" if row.get(key) is None else f"{row[key]:.{digits}f}"

    columns = [  # (header, key, digits)
        ("s/step", "seconds_per_step", 3),
        ("it/s", "steps_per_second", 2),
        ("1st step s", "first_step_seconds", 2),
        ("max_alloc GiB", "max_memory_allocated_gib", 3),
        ("max_resv GiB", "max_memory_reserved_gib", 3),
        ("est. peak GiB", "estimate_peak_gib", 3),
        ("est/meas", "estimate_over_measured", 3),
        ("est. total GiB", "estimate_total_gib", 3),
    ]
    header = f"{'config':<28}" + "".join(f" {title:>{len(title)}}" for title, _, _ in columns)
    print(header)
    print("-" * len(header))
    for row in rows:
        if "skipped" in row or "failed" in row:
            what = f"skipped: {row['skipped']}" if "skipped" in row else f"FAILED: {row['failed']}"
            print(f"{row['config']:<28} {what}")
            continue
        print(f"{row['config']:<28}" + "".join(f" {number(row, key, d):>{len(title)}}" for title, key, d in columns))


def main(argv: list[str] | None = None) -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default=None, help="sd15 (default on CUDA) or a bench model (bench-tiny on CPU)")
    parser.add_argument("--resolution", type=int, default=None, help="px (default 512 on CUDA, 64 on the CPU)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--json", help="also write the rows and the machine as JSON here")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.arch = args.arch or ("sd15" if cuda else "bench-tiny")
    args.resolution = args.resolution or (512 if cuda else 64)
    info = machine(args.device)
    print(json.dumps(info))
    print(f"arch {args.arch}, {args.resolution} px, batch 1 + 1 class image, {args.steps} steps", end=" ")
    print(f"(median after {args.warmup})")
    arch = architecture(args.arch)
    rows, failed = [], False
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as temp:
        for name in args.configs:
            reason = why_not(CONFIGS[name], args.device)
            if reason:
                rows.append({"config": name, "skipped": reason})
                print(f"{name}: skipped ({reason})", flush=True)
                continue
            try:
                row = measure(name, CONFIGS[name], arch, args, Path(temp))
            except Exception as error:  # one configuration's failure must not lose the others' figures
                traceback.print_exc()
                rows.append({"config": name, "failed": f"{type(error).__name__}: {error}"[:300]})
                failed = True
                continue
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:  # after each row: a figure once measured is kept if a later configuration hangs
                Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "args": vars(args), "rows": rows}, indent=2))
    print()
    print_rows(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
