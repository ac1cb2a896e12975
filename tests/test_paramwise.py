"""Less memory: the fused backward pass (fused_backward) and bf16 weights with stochastic rounding (full_bf16).

Shown on the tiny model on the CPU: the fused optimizer reaches the ordinary optimizer's weights (AdamW and 8-bit
AdamW, with gradient accumulation), never holds two gradients at once, resumes bit for bit, clips per parameter;
stochastic rounding is unbiased where round-to-nearest loses an update; the model learns with bf16 weights; the
options it cannot work with are refused with a sentence.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from dreambooth.events import Callbacks, Commands
from dreambooth.models.components import load_components
from dreambooth.train.loop import Trainer
from dreambooth.train.paramwise import ParamwiseOptimizer, stochastic_round_bf16


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# ------------------------------------------------------------------------------------------- stochastic rounding


def test_stochastic_rounding_is_unbiased_where_round_to_nearest_loses_the_update():
    """1 + 1e-4: a bf16 step at 1.0 is 2**-7 (0.0078), so round-to-nearest gives 1.0 and the update is lost."""
    updated = torch.full((200_000,), 1.0 + 1e-4)
    nearest = updated.to(torch.bfloat16).float()
    assert torch.equal(nearest, torch.ones_like(updated))  # the update is gone entirely
    rounded = stochastic_round_bf16(updated, torch.Generator().manual_seed(0))
    assert rounded.dtype == torch.bfloat16
    values = set(rounded.float().unique().tolist())
    assert values == {1.0, 1.0 + 2**-7}  # each result is one of the two neighbouring bf16 values
    # the mean is the fp32 value: the standard error of the mean is 0.0078 * sqrt(p(1-p) / n) ~ 2e-6
    assert rounded.float().mean().item() == pytest.approx(1.0 + 1e-4, abs=1e-5)
    # negative values and other magnitudes too (sign-magnitude: the magnitude is rounded the same way)
    for value in (-3.0 - 1e-3, 1e-20 * (1 + 1e-3), -250.7):
        x = torch.full((200_000,), value)
        step = (x.to(torch.bfloat16).float() - x).abs().max().item() * 2 + abs(value) * 2**-7
        mean = stochastic_round_bf16(x, torch.Generator().manual_seed(1)).float().mean().item()
        assert mean == pytest.approx(value, abs=step * 0.02)


def test_stochastic_rounding_keeps_many_small_updates_that_round_to_nearest_loses():
    """1000 updates of +1e-4 to a bf16 weight of 1.0: about +0.1 with stochastic rounding, +0 with round-to-nearest."""
    generator = torch.Generator().manual_seed(0)
    stochastic = torch.ones(1000, dtype=torch.bfloat16)
    nearest = torch.ones(1000, dtype=torch.bfloat16)
    for _ in range(1000):
        stochastic = stochastic_round_bf16(stochastic.float() + 1e-4, generator)
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
    assert torch.equal(nearest.float(), torch.ones(1000))
    assert stochastic.float().mean().item() == pytest.approx(1.1, abs=0.005)


def test_stochastic_rounding_is_exact_for_bf16_values_and_seeded():
    exact = torch.randn(1000).to(torch.bfloat16).float()
    assert torch.equal(stochastic_round_bf16(exact, torch.Generator().manual_seed(3)).float(), exact)
    x = torch.randn(1000)
    first = stochastic_round_bf16(x, torch.Generator().manual_seed(5))
    assert torch.equal(first, stochastic_round_bf16(x, torch.Generator().manual_seed(5)))
    assert not torch.equal(first, stochastic_round_bf16(x, torch.Generator().manual_seed(6)))


# ------------------------------------------------------------------------------------------- fused backward


@pytest.mark.parametrize(
    ("optimizer", "checkpointing"),
    [("adamw", False), ("adamw_8bit", False), ("adamw", True)],
    ids=["adamw", "adamw_8bit", "adamw-checkpointing"],
)
def test_fused_backward_reaches_the_ordinary_optimizers_weights(make_settings, tmp_path, optimizer, checkpointing):
    """3 steps of 2 micro-batches each, UNet and text encoder trained (two groups with their own learning rates);
    with gradient checkpointing the recomputation in the backward pass must see the weights not yet updated."""
    common = {
        "gradient_checkpointing": checkpointing,
        "max_train_steps": 3,
        "gradient_accumulation_steps": 2,
        "train_text_encoder": True,
        "text_encoder_learning_rate": 5e-4,
        "lr_scheduler": "linear",  # the schedule's learning rate reaches every parameter's optimizer
        "lr_warmup_steps": 1,
        "max_grad_norm": 0.0,  # global clipping and per-parameter clipping differ by design
        "optimizer": optimizer,
    }
    ordinary = Trainer(make_settings(output_dir=str(tmp_path / "ordinary"), **common))
    ordinary.run()
    fused = Trainer(make_settings(output_dir=str(tmp_path / "fused"), fused_backward=True, **common))
    fused.run()
    for name in ("unet", "text_encoder"):
        a, b = weights(getattr(ordinary.components, name)), weights(getattr(fused.components, name))
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)
    base = weights(load_components(make_settings().pretrained_model_name_or_path).unet)
    trained = weights(fused.components.unet)
    assert sum(not torch.equal(trained[k], base[k]) for k in base) > 10  # the runs trained: the weights moved


def test_fused_backward_updates_in_the_backward_pass_and_frees_each_gradient(make_settings, monkeypatch):
    """At each update at most one gradient exists (fused); the ordinary per-parameter step sees all of them."""
    live: list[int] = []
    in_backward: list[bool] = []
    original = ParamwiseOptimizer._update

    def update(self, index):
        live.append(sum(p.grad is not None for p in self.params))
        in_backward.append(self.armed)
        return original(self, index)

    monkeypatch.setattr(ParamwiseOptimizer, "_update", update)
    trainer = Trainer(make_settings(fused_backward=True))
    trainer.run()
    count = len(list(trainer.components.unet.parameters()))
    assert len(live) == 2 * count  # every parameter, each step
    assert max(live) == 1 and all(in_backward)
    assert not trainer.components.unet.conv_in.weight._post_accumulate_grad_hooks  # hooks removed after the run
    live.clear()
    Trainer(make_settings(mixed_precision="bf16", full_bf16=True)).run()  # per parameter, after the backward pass
    assert live[0] == count


def test_fused_backward_clips_each_parameters_gradient_to_max_grad_norm(make_settings):
    """Each inner optimizer sees one parameter's gradient: its norm is at most max_grad_norm; the global norm of the
    step is larger (per-parameter clipping, as documented)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    norms: list[float] = []

    def record(optimizer, args, kwargs):
        if isinstance(optimizer, ParamwiseOptimizer):
            return
        for group in optimizer.param_groups:
            norms.extend(torch.linalg.vector_norm(p.grad).item() for p in group["params"] if p.grad is not None)

    handle = register_optimizer_step_pre_hook(record)
    try:
        Trainer(make_settings(max_train_steps=1, fused_backward=True, max_grad_norm=0.0)).run()
        unclipped, norms[:] = list(norms), []
        bound = 1e-3
        Trainer(make_settings(max_train_steps=1, fused_backward=True, max_grad_norm=bound)).run()
        clipped = list(norms)
    finally:
        handle.remove()
    assert len(clipped) == len(unclipped) > 100
    assert sum(n > bound for n in unclipped) > 10  # many parameters' gradients exceed the bound unclipped
    assert max(clipped) <= bound * (1 + 1e-4)
    assert sum(n**2 for n in clipped) ** 0.5 > 3 * bound  # not the global norm


# ------------------------------------------------------------------------------------------- resume


class CancelAt(Callbacks):
    def __init__(self, commands, step):
        self.commands, self.step = commands, step

    def on_progress(self, progress):
        if progress.phase == "training" and progress.step == self.step:
            self.commands.cancel()


def split_run(make_settings, out, first: dict, second: dict) -> Trainer:
    commands = Commands()
    interrupted = Trainer(make_settings(output_dir=str(out), **first), CancelAt(commands, 3), commands).run()
    assert interrupted.cancelled and interrupted.step == 3
    resumed = Trainer(make_settings(output_dir=str(out), resume_from=str(interrupted.state_dir), **second))
    assert resumed.run().step == 6
    return resumed


@pytest.mark.slow
@pytest.mark.parametrize(
    "memory",
    [{"fused_backward": True}, {"fused_backward": True, "full_bf16": True, "mixed_precision": "bf16"}],
    ids=["fused", "fused-bf16"],
)
def test_resume_with_fused_backward_is_exact(make_settings, tmp_path, memory):
    common = {"max_train_steps": 6, "gradient_accumulation_steps": 2, "train_text_encoder": True, **memory}
    straight = Trainer(make_settings(output_dir=str(tmp_path / "straight"), **common))
    straight.run()
    resumed = split_run(make_settings, tmp_path / "split", common, common)
    assert_same(weights(straight.components.unet), weights(resumed.components.unet))
    assert_same(weights(straight.components.text_encoder), weights(resumed.components.text_encoder))


def test_a_state_saved_without_fused_backward_resumes_with_it(make_settings, tmp_path):
    """The optimizer state has one format: an ordinary run's state resumes fused and reaches the ordinary weights."""
    common = {"max_train_steps": 6, "max_grad_norm": 0.0}
    straight = Trainer(make_settings(output_dir=str(tmp_path / "straight"), **common))
    straight.run()
    resumed = split_run(make_settings, tmp_path / "split", common, {**common, "fused_backward": True})
    a, b = weights(straight.components.unet), weights(resumed.components.unet)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------- bf16 weights


@pytest.mark.slow
def test_the_tiny_model_learns_with_bf16_weights(make_settings):
    dtypes = set()

    class Watch(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training":
                dtypes.update(p.dtype for p in trainer.components.unet.parameters())

    settings = make_settings(
        max_train_steps=40,
        learning_rate=3e-4,
        center_crop=True,
        mixed_precision="bf16",
        full_bf16=True,
        fused_backward=True,
    )
    trainer = Trainer(settings, callbacks=Watch())
    result = trainer.run()
    losses = [loss for _, loss in result.losses]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10
    assert dtypes == {torch.bfloat16}  # bf16 while training
    unet = weights(trainer.components.unet)
    assert {v.dtype for v in unet.values()} == {torch.float32}  # fp32 again after the run, with the bf16 values
    assert all(torch.equal(v, v.bfloat16().float()) for v in unet.values())
    from dreambooth.models.files import read_state_dict

    saved, _ = read_state_dict(result.checkpoints[-1])
    assert {v.dtype for v in saved.values() if v.is_floating_point()} == {torch.float32}


def test_optimizer_states_of_bf16_weights_are_fp32(make_settings, monkeypatch):
    from dreambooth.train import optim

    made = []
    original = optim.make_optimizer
    monkeypatch.setattr(optim, "make_optimizer", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    Trainer(make_settings(mixed_precision="bf16", full_bf16=True)).run()
    [optimizer] = made
    states = [s for s in optimizer.state.values() if s]
    assert states and all(s["exp_avg"].dtype == s["exp_avg_sq"].dtype == torch.float32 for s in states)


# ------------------------------------------------------------------------------------------- refusals, 8-bit


def test_what_fused_backward_and_full_bf16_cannot_work_with_is_refused_with_a_sentence(make_settings, monkeypatch):
    from dreambooth.settings import SettingsError

    problems = make_settings(fused_backward=True, mixed_precision="fp16").validate()
    assert (
        "fused_backward cannot be used with mixed_precision fp16: the fp16 gradient scaler must see every gradient "
        "before any weight changes; use mixed_precision bf16 or no, or turn fused_backward off"
    ) in problems
    problems = make_settings(full_bf16=True).validate()
    assert (
        "full_bf16 needs mixed_precision bf16 (the bf16 weights compute under bf16 autocast); set mixed_precision "
        "bf16 or turn full_bf16 off"
    ) in problems
    assert make_settings(full_bf16=True, fused_backward=True, mixed_precision="bf16").validate() == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    problems = make_settings(fused_backward=True).validate()
    assert any(p.startswith("fused_backward cannot be used with several processes (2 were launched)") for p in problems)
    with pytest.raises(SettingsError, match="fused_backward cannot be used with several processes"):
        Trainer(make_settings(fused_backward=True)).run()


def test_eight_bit_adamw_trains_on_the_cpu_with_8_bit_states(make_settings, monkeypatch):
    import bitsandbytes as bnb

    from dreambooth.train import optim

    made = []
    original = optim.make_optimizer
    monkeypatch.setattr(optim, "make_optimizer", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    Trainer(make_settings(optimizer="adamw_8bit")).run()
    [optimizer] = made
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    assert any(s["state1"].dtype == torch.uint8 for s in optimizer.state.values() if "state1" in s)


def test_importing_bitsandbytes_prints_nothing_and_leaves_its_loggers_as_they_were(tiny_checkpoint, caplog):
    """diffusers imports bitsandbytes when it is installed; bitsandbytes 0.50 then warns about a CPU kernel package."""
    import logging

    from dreambooth.compat import quiet_bitsandbytes

    script = (
        "import sys\n"
        "from dreambooth.models.components import load_components\n"
        "load_components(sys.argv[1])\n"
        "import bitsandbytes\n"  # imported by diffusers above (quietly)
        "from dreambooth.train.optim import _eight_bit_class\n"
        "_eight_bit_class('adamw_8bit', 'cpu')\n"
    )
    command = [sys.executable, "-c", script, str(tiny_checkpoint("sd1"))]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "kernels" not in done.stderr and done.stdout == ""
    child = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING), quiet_bitsandbytes():
        child.warning("Failed to load CPU gemm_4bit_forward from kernels-community")
    assert not caplog.records and logging.getLogger("bitsandbytes").level == logging.NOTSET
    with caplog.at_level(logging.WARNING):
        child.warning("after the block")
    assert [r.getMessage() for r in caplog.records] == ["after the block"]


def test_out_of_memory_advice_offers_fused_backward_and_bf16_weights_until_they_are_on(make_settings):
    from dreambooth.train.failures import out_of_memory_message

    def advice(**changes):
        return out_of_memory_message(make_settings(**changes), peak_bytes=None, total_bytes=None, model_bytes=2**30)

    assert "fused_backward on" in advice() and "full_bf16 on (with mixed_precision bf16)" in advice()
    on = advice(fused_backward=True, full_bf16=True, mixed_precision="bf16")
    assert "fused_backward" not in on and "full_bf16" not in on
    assert "fused_backward" not in advice(mixed_precision="fp16")  # refused with fp16: not offered
