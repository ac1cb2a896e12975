"""The estimate for a CUDA GPU normalises in float32 under autocast, as CUDA's autocast does (memory/cuda_autocast.py).

Found on an H200 (docs/benchmarks.md, "GPU (H200)"): with the CPU's autocast lists the dry run kept GroupNorm and
LayerNorm outputs in half precision, and the estimate of the 6 GiB card's fit preset (bf16, no checkpointing) was
13.5% under ``torch.cuda.max_memory_allocated``.  The GPU side is tests/test_gpu_estimate.py (its ``bf16`` and
``fit-preset-6gib`` rows)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from dreambooth.memory.cuda_autocast import normalize_in_float32


def block():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(32, 32, 3, padding=1), torch.nn.GroupNorm(8, 32), torch.nn.SiLU())


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32-weights", "bf16-weights"])
def test_norms_give_float32_under_autocast_with_the_numbers_of_a_float32_normalisation(weights):
    plain, changed = block().to(weights), block().to(weights)
    layer_norm = torch.nn.LayerNorm(16).to(weights)
    normalize_in_float32(changed)
    normalize_in_float32(layer_norm)
    x = torch.randn(2, 32, 8, 8, dtype=weights)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = changed[0](x)  # the convolution: bf16 under autocast, as on CUDA
        normalised = changed[1](hidden)
        assert plain(x).dtype == torch.bfloat16  # the CPU's list: the input's dtype
        assert layer_norm(torch.randn(2, 4, 16, dtype=torch.bfloat16)).dtype == torch.float32
    assert hidden.dtype == torch.bfloat16 and normalised.dtype == torch.float32
    expected = F.group_norm(hidden.float(), 8, changed[1].weight.float(), changed[1].bias.float(), changed[1].eps)
    assert torch.equal(normalised, expected)
    # without autocast nothing changes
    assert changed(x).dtype == weights and torch.equal(changed(x), plain(x))


@pytest.mark.slow
def test_the_cuda_estimate_keeps_the_normalised_activations_in_float32_only_under_mixed_precision(
    make_settings, monkeypatch
):
    """bf16 weights + fused backward (the peak at the end of the forward pass, as in the 6 GiB preset): the CUDA
    estimate's activations grow by the float32 normalisation outputs, nothing else changes; fp32 (no autocast): the
    same estimate either way."""
    from dreambooth.bench import bench_architecture
    from dreambooth.memory import dryrun
    from dreambooth.memory.estimate import estimate
    from dreambooth.memory.tracker import ACTIVATIONS

    arch = bench_architecture("bench-small")
    base = dataclasses.replace(make_settings(), resolution=128, pretrained_model_name_or_path="in-memory")

    def estimates(settings):
        with monkeypatch.context() as patched:
            patched.setattr(dryrun, "normalize_in_float32", lambda module: None)
            cpu_lists = estimate(settings, arch)
        return cpu_lists, estimate(settings, arch)

    cpu_lists, cuda_lists = estimates(
        dataclasses.replace(base, mixed_precision="bf16", full_bf16=True, fused_backward=True)
    )
    assert cuda_lists.breakdown[ACTIVATIONS] > 1.15 * cpu_lists.breakdown[ACTIVATIONS]
    others = set(cpu_lists.breakdown) - {ACTIVATIONS}
    assert {k: cuda_lists.breakdown.get(k) for k in others} == {k: cpu_lists.breakdown[k] for k in others}
    fp32_cpu_lists, fp32_cuda_lists = estimates(base)
    assert fp32_cuda_lists.peak_bytes == fp32_cpu_lists.peak_bytes
