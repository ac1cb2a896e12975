"""Where the GPU peak of a configuration is reached (not a test; docs/benchmarks.md, "GPU (H200)"): per step, GiB
allocated when the forward pass starts, the forward pass's peak, allocated after it (loss computed), and the peak of
backward + optimizer; for the 6 GiB fit preset and bf16 with cuDNN on and off, the 5 GiB preset and the default.
SD 1.5 architecture with random weights at 512 px on CUDA (bench-tiny at 64 px on the CPU: a dry run, all zeros).
Usage from the repository root: ``python tools/gpu_memory_probe.py`` (one JSON line per configuration)."""

import dataclasses
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_bench
import torch

from dreambooth.models.tiny import tiny_components
from dreambooth.train.loop import Trainer

CUDA = torch.cuda.is_available()
GIB = 2**30


def sync():
    if CUDA:
        torch.cuda.synchronize()


def allocated():
    return torch.cuda.memory_allocated() / GIB if CUDA else 0.0


def peak():
    return torch.cuda.max_memory_allocated() / GIB if CUDA else 0.0


def reset():
    if CUDA:
        torch.cuda.reset_peak_memory_stats()


class Probe(Trainer):
    def _steps(self, run):
        sync()
        reset()
        self.records, self.segment = [], None
        self.before_steps = allocated()
        super()._steps(run)
        sync()
        if self.records:
            self.records[-1]["backward_optimizer_peak"] = peak()
        self.overall = max(
            [r["forward_peak"] for r in self.records] + [r.get("backward_optimizer_peak", 0) for r in self.records]
        )

    def _loss(self, *args, **kwargs):
        sync()
        if self.records:
            self.records[-1]["backward_optimizer_peak"] = peak()
        reset()
        start = allocated()
        out = super()._loss(*args, **kwargs)
        sync()
        self.records.append({"start": start, "forward_peak": peak(), "after_forward": allocated()})
        reset()
        return out


def main():
    arch = gpu_bench.architecture("sd15" if CUDA else "bench-tiny")
    resolution = 512 if CUDA else 64
    cases = [
        ("fit-preset-6gib", gpu_bench.FIT_6GIB, True),
        ("fit-preset-6gib", gpu_bench.FIT_6GIB, False),
        ("bf16", {"mixed_precision": "bf16"}, True),
        ("bf16", {"mixed_precision": "bf16"}, False),
        ("fit-preset-5gib", {**gpu_bench.FIT_6GIB, "gradient_checkpointing": True}, True),
        ("default", {}, True),
    ]
    with tempfile.TemporaryDirectory() as temp:
        for name, changes, cudnn in cases:
            torch.backends.cudnn.enabled = cudnn
            settings = dataclasses.replace(
                gpu_bench.base_settings(Path(temp), resolution, 3, "cuda" if CUDA else "cpu"), **changes
            )
            torch.manual_seed(0)
            trainer = Probe(
                settings, components=tiny_components(arch, seed=0), final_save=False, check_model_path=False
            )
            started = time.perf_counter()
            result = trainer.run()
            row = {
                "config": name,
                "cudnn": cudnn,
                "before_steps": trainer.before_steps,
                "overall_peak": trainer.overall,
                "seconds_per_step": sorted(result.step_seconds)[len(result.step_seconds) // 2],
                "steps": [{k: round(v, 3) for k, v in r.items()} for r in trainer.records],
                "seconds": time.perf_counter() - started,
            }
            print(json.dumps(row), flush=True)
            del trainer, result
            gc.collect()
            if CUDA:
                torch.cuda.empty_cache()
    torch.backends.cudnn.enabled = True


if __name__ == "__main__":
    main()
