"""The benchmark's floor steps the same optimizer implementation as the trainer modes it is compared with."""

from __future__ import annotations

import tempfile

import pytest

from dreambooth import bench


def _optimizer_used(mode: str, train_text: bool) -> dict:
    """What the optimizer of one bench measurement (tiny64, 2 steps) is: class, flags, hyper-parameters, groups."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = []
    handle = register_optimizer_step_post_hook(lambda optimizer, args, kwargs: seen.append(optimizer))
    try:
        spec = {"scale": "tiny64", "mode": mode, "prior": False, "train_text": train_text, "batch": 1}
        bench.measure_one({**spec, "steps": 2, "warmup": 0})
    finally:
        handle.remove()
    assert len(seen) >= 2  # the 2 timed steps come first; the memory passes (bench.TRACKED_STEPS) step too
    optimizer = seen[0]
    return {
        "class": type(optimizer),
        "fused": optimizer.defaults.get("fused"),
        "foreach": optimizer.defaults.get("foreach"),
        "betas": optimizer.defaults["betas"],
        "eps": optimizer.defaults["eps"],
        "weight_decay": optimizer.defaults["weight_decay"],
        "group_sizes": [sum(p.numel() for p in group["params"]) for group in optimizer.param_groups],
    }


@pytest.mark.slow
@pytest.mark.parametrize("train_text", [False, True], ids=["text-frozen", "text-trained"])
def test_floor_uses_the_trainers_optimizer(tmp_path, monkeypatch, train_text):
    from dreambooth.train.optim import supports_fused_adamw

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    floor = _optimizer_used("floor", train_text)
    default = _optimizer_used("default", train_text)
    naive = _optimizer_used("naive", train_text)
    assert floor == default == naive
    assert bool(floor["fused"]) == supports_fused_adamw("cpu")  # fused where this torch has it, in every mode
    assert len(floor["group_sizes"]) == (2 if train_text else 1)  # the text encoder is stepped only when trained


def test_floor_fused_mode_is_gone():
    from dreambooth.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--modes", "floor_fused"])
