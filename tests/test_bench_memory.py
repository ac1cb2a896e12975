"""The benchmark's memory columns: the estimate of each trainer row's configuration and the tracked real peak (they
agree, as the CPU agreement test requires), the floor's tracked peak, and the dry run taking the trainer's
``cache_text`` flag (the naive row's code path)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from conftest import agreement_settings

from dreambooth import bench
from dreambooth.memory.dryrun import TEXT_CACHE_LABEL, TrackedTrainer
from dreambooth.memory.estimate import estimate
from dreambooth.memory.tracker import GRADIENTS, OPTIMIZER_STATES
from dreambooth.settings import Settings

SPEC = {"scale": "tiny64", "prior": True, "train_text": False, "batch": 1, "steps": 2, "warmup": 0}


@pytest.mark.slow  # 5-30 s: a timed run, a tracked run and the estimate
def test_the_default_row_reports_its_estimate_and_tracked_peak_and_they_agree(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    row = bench.measure_one({**SPEC, "mode": "default"})
    assert row["estimate_mib"] > 0 and row["tracked_mib"] > 0
    assert abs(row["estimate_mib"] - row["tracked_mib"]) <= 0.03 * row["tracked_mib"], row
    assert row["seconds_per_step"] > 0 and row["peak_memory_gib"] > 0  # the timed figures are still there


@pytest.mark.slow
def test_the_floor_row_reports_the_tracked_peak_of_its_bare_steps_and_no_estimate(tmp_path, monkeypatch):
    from dreambooth.models.tiny import tiny_components

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    row = bench.measure_one({**SPEC, "mode": "floor"})
    assert row["estimate_mib"] is None
    unet = tiny_components(bench.bench_architecture("bench-tiny"), seed=0).unet
    weights = sum(p.numel() * 4 for p in unet.parameters())
    # fp32 AdamW: weights, gradients and two states of the UNet are all live in a step, and activations on top
    assert row["tracked_mib"] * bench.MIB > 4 * weights, row


def test_median_rows_and_the_table_show_both_columns_and_a_dash_for_no_estimate(capsys):
    runs = {
        ("tiny64", True, False, "default"): [
            {"seconds_per_step": 0.3, "peak_memory_gib": 0.5, "estimate_mib": 85.0, "tracked_mib": 85.0},
            {"seconds_per_step": 0.5, "peak_memory_gib": 0.5, "estimate_mib": 85.0, "tracked_mib": 85.0},
        ],
        ("tiny64", True, False, "floor"): [
            {"seconds_per_step": 0.2, "peak_memory_gib": 0.5, "estimate_mib": None, "tracked_mib": 76.5},
        ],
    }
    rows = bench.median_rows(runs)
    assert rows[0]["seconds_per_step"] == pytest.approx(0.4) and rows[1]["estimate_mib"] is None
    bench.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    header = next(line for line in lines if line.startswith("scale"))
    assert "est. MiB" in header and "tracked MiB" in header and "peak GiB" in header
    cells = {line.split()[3]: line.split() for line in lines if line.startswith("tiny64")}
    default, floor = cells["default"], cells["floor"]
    assert default[6:9] == ["0.50", "85.0", "85.0"]  # peak GiB, est. MiB, tracked MiB (after params, s/step)
    assert floor[6:9] == ["0.50", "—", "76.5"]


@pytest.mark.slow
def test_the_estimate_takes_the_trainers_cache_text_flag_and_agrees_with_that_real_run(tmp_path):
    """The naive configuration (no latent cache, the frozen text encoder run every step): the estimate with
    ``cache_text=False`` holds no cached embeddings, as the real run with that flag, and agrees with it within 3%."""
    from dreambooth.models.tiny import tiny_components

    arch = bench.bench_architecture("bench-tiny")
    settings = agreement_settings(tmp_path, 64, cache_latents=False)
    cached = estimate(settings, arch, device_type="cpu")
    uncached = estimate(settings, arch, device_type="cpu", cache_text=False)
    torch.manual_seed(0)
    trainer = TrackedTrainer(
        settings, components=tiny_components(arch, seed=0), cache_text=False, final_save=False, check_model_path=False
    )
    trainer.run()
    real = trainer.tracker
    assert TEXT_CACHE_LABEL in cached.breakdown
    assert TEXT_CACHE_LABEL not in uncached.breakdown and TEXT_CACHE_LABEL not in real.breakdown
    assert abs(uncached.peak_bytes - real.peak) <= 0.03 * real.peak, (uncached.breakdown, real.breakdown)
    for label in ("weights, trained (fp32)", "weights, frozen (fp32)", GRADIENTS, OPTIMIZER_STATES):
        assert uncached.breakdown.get(label) == real.breakdown.get(label), label


def test_the_dry_run_keeps_the_flag_it_is_given():
    from dreambooth.memory.dryrun import DryRun

    arch = bench.bench_architecture("bench-tiny")
    settings = Settings(pretrained_model_name_or_path="x", resolution=64)
    assert DryRun(settings, arch).cache_text is True
    assert DryRun(settings, arch, cache_text=False).cache_text is False
