"""The optimizers beyond AdamW (issue 16): each trains the tiny model, resumes exactly, works with fused_backward or
is refused with a sentence, and is refused with a sentence naming its package when that is missing.

"Trains": the loss of the run's own samples (their latents, noises and timesteps, fixed by the seed) with the weights
after six steps is lower than with the base weights: a deterministic measure, unlike the noisy loss of each step.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from dreambooth.errors import DreamBoothError
from dreambooth.events import Callbacks, Commands
from dreambooth.settings import SettingsError
from dreambooth.train.loop import Trainer

# a learning rate that suits each on the tiny model (Prodigy's multiplies the step size it finds: 1.0)
LEARNING_RATES = {
    "adafactor": 3e-4,
    "prodigy": 1.0,
    "lion": 3e-4,
    "lion_8bit": 3e-4,
    "adamw_schedule_free": 1e-3,
}
STEPS = 6  # two epochs of the three images


class Measured(Trainer):
    """Measures the loss of the run's samples (one per step) before the first step and after the last."""

    def _steps(self, run):
        self.made = run.optimizer
        self.before = self.fixed_loss(run)
        super()._steps(run)
        from dreambooth.train.optimizers import use_averaged_weights

        use_averaged_weights(run.optimizer)  # schedule-free: the weights it saves
        self.after = self.fixed_loss(run)

    def fixed_loss(self, run):
        with torch.no_grad():
            losses = [
                self._loss(run.plan.batch(i, run.global_batch), 0, False, run.device, contextlib.nullcontext())[0]
                for i in range(run.total)
            ]
        return float(sum(losses)) / run.total


def trained(make_settings, tmp_path, optimizer, steps=STEPS, **changes):
    settings = make_settings(
        output_dir=str(tmp_path / optimizer),
        optimizer=optimizer,
        learning_rate=LEARNING_RATES[optimizer],
        max_train_steps=steps,
        center_crop=True,
        save_training_state=False,
        **changes,
    )
    trainer = Measured(settings)
    trainer.run()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(set(LEARNING_RATES) - {"prodigy"}))
def test_each_optimizer_trains_the_tiny_model(optimizer, make_settings, tmp_path):
    trainer = trained(make_settings, tmp_path, optimizer)
    assert trainer.after < 0.9 * trainer.before, (trainer.before, trainer.after)


@pytest.mark.slow
def test_prodigy_raises_its_step_size_and_trains_the_tiny_model(make_settings, tmp_path):
    """Prodigy starts from a step size of 1e-6 (its d0) and raises it as it learns the scale: slowly on a model this
    small, so twelve steps and a smaller fall than the others' in six."""
    trainer = trained(make_settings, tmp_path, "prodigy", steps=12)
    assert trainer.made.param_groups[0]["d"] > 2e-6  # its estimate grew from d0 = 1e-6
    assert trainer.after < 0.98 * trainer.before, (trainer.before, trainer.after)


def test_each_optimizer_is_its_librarys_with_the_settings_values(make_settings):
    import bitsandbytes as bnb
    import lion_pytorch
    import prodigyopt
    import schedulefree
    from transformers.optimization import Adafactor

    from dreambooth.train.optim import make_optimizer

    def made(**changes):
        groups = [{"params": [torch.nn.Parameter(torch.zeros(4096))], "lr": 0.5}]
        return make_optimizer(groups, make_settings(**changes), "cpu")

    adafactor = made(optimizer="adafactor", adam_weight_decay=0.25).param_groups[0]
    assert isinstance(made(optimizer="adafactor"), Adafactor)
    assert (adafactor["relative_step"], adafactor["scale_parameter"], adafactor["warmup_init"]) == (False,) * 3
    assert (adafactor["lr"], adafactor["beta1"], adafactor["weight_decay"]) == (0.5, None, 0.25)
    prodigy = made(
        optimizer="prodigy",
        prodigy_d_coef=0.5,
        prodigy_use_bias_correction=True,
        prodigy_safeguard_warmup=True,
        adam_beta1=0.8,
    )
    assert isinstance(prodigy, prodigyopt.Prodigy)
    group = prodigy.param_groups[0]
    assert (group["d_coef"], group["use_bias_correction"], group["safeguard_warmup"]) == (0.5, True, True)
    assert group["betas"] == (0.8, 0.999)
    lion = made(optimizer="lion", adam_beta2=0.99, adam_weight_decay=0.1)
    assert isinstance(lion, lion_pytorch.Lion) and lion.param_groups[0]["betas"] == (0.9, 0.99)
    assert lion.param_groups[0]["weight_decay"] == 0.1
    assert isinstance(made(optimizer="lion_8bit"), bnb.optim.Lion8bit)
    free = made(optimizer="adamw_schedule_free", adam_epsilon=1e-6)
    assert isinstance(free, schedulefree.AdamWScheduleFree) and free.param_groups[0]["eps"] == 1e-6


@pytest.mark.parametrize(
    ("optimizer", "package"),
    [("prodigy", "prodigyopt"), ("lion", "lion_pytorch"), ("adamw_schedule_free", "schedulefree")],
)
def test_a_missing_package_refuses_the_settings_with_how_to_install_it(
    optimizer, package, make_settings, monkeypatch, tmp_path
):
    import sys

    pip_name = {"lion_pytorch": "lion-pytorch"}.get(package, package)
    monkeypatch.setitem(sys.modules, package, None)  # import blocked: "import x" raises, find_spec says None
    problems = make_settings(optimizer=optimizer).validate()
    expected = (
        f"optimizer {optimizer} needs the {pip_name} package, which is not installed: install it with "
        f"'pip install {pip_name}' (in the WebUI's Python environment for the tab), or choose optimizer adamw"
    )
    assert expected in problems
    with pytest.raises(SettingsError, match=f"optimizer {optimizer} needs the {pip_name} package"):
        Trainer(make_settings(optimizer=optimizer)).run()
    # and when the settings were not checked, the optimizer's construction says the same
    from dreambooth.train.optim import make_optimizer

    groups = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0}]
    with pytest.raises(DreamBoothError, match=f"optimizer {optimizer} needs the {pip_name} package"):
        make_optimizer(groups, make_settings(optimizer=optimizer), "cpu")
    # the tab's environment note says how to install it
    from dreambooth.host import Host

    notes = Host(tmp_path / "models", allowed_roots=[tmp_path]).environment_notes()
    assert f"optimizer {optimizer} is unavailable: pip install {pip_name}" in notes


def test_prodigy_and_schedule_free_are_refused_with_fused_backward_the_others_step_per_parameter(make_settings):
    for optimizer in ("prodigy", "adamw_schedule_free"):
        for flag, extra in (("fused_backward", {}), ("full_bf16", {"mixed_precision": "bf16"})):
            problems = make_settings(optimizer=optimizer, **{flag: True}, **extra).validate()
            assert (
                f"optimizer {optimizer} cannot be used with {flag}: {flag} steps one optimizer per parameter, and "
                f"{optimizer} keeps values over all parameters together; turn {flag} off or choose another optimizer"
            ) in problems
    for optimizer in ("adafactor", "lion", "lion_8bit"):
        assert make_settings(optimizer=optimizer, fused_backward=True).validate() == []


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adafactor", "lion"])
def test_fused_backward_with_adafactor_and_lion_trains_with_per_parameter_optimizers(
    optimizer, make_settings, tmp_path
):
    from dreambooth.train.paramwise import ParamwiseOptimizer

    trainer = trained(make_settings, tmp_path, optimizer, fused_backward=True)
    assert isinstance(trainer.made, ParamwiseOptimizer)
    assert trainer.after < 0.9 * trainer.before


def test_prodigy_with_a_small_learning_rate_is_warned(make_settings):
    from dreambooth.validation import training_warnings

    arch = type("Arch", (), {"family": "sd1", "prediction_type": "epsilon"})()
    found = training_warnings(make_settings(optimizer="prodigy", learning_rate=1e-4), arch)
    assert any("optimizer prodigy with learning_rate 0.0001" in w and "1.0 is recommended" in w for w in found)
    assert not any(
        "prodigy" in w for w in training_warnings(make_settings(optimizer="prodigy", learning_rate=1.0), arch)
    )


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", sorted(LEARNING_RATES))
def test_each_optimizer_resumes_exactly(optimizer, make_settings, tmp_path):
    """Four steps straight, and two + two through a saved state: the same weights to the bit.  The straight run
    saves at step 2 too (a schedule-free save switches to the averaged weights and back: both runs do it)."""
    common = {
        "optimizer": optimizer,
        "learning_rate": LEARNING_RATES[optimizer],
        "max_train_steps": 4,
        "save_model_every_n_steps": 2,
    }
    straight = Trainer(make_settings(output_dir=str(tmp_path / "straight"), **common))
    straight.run()

    class CancelAtTwo(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == 2:
                commands.cancel()

    commands = Commands()
    split = make_settings(output_dir=str(tmp_path / "split"), **common)
    interrupted = Trainer(split, callbacks=CancelAtTwo(), commands=commands).run()
    assert interrupted.cancelled and interrupted.step == 2
    resumed = Trainer(
        make_settings(output_dir=str(tmp_path / "split"), resume_from=str(interrupted.state_dir), **common)
    )
    assert resumed.run().step == 4
    a, b = straight.components.unet.state_dict(), resumed.components.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_schedule_free_saves_and_leaves_its_averaged_weights(make_settings, tmp_path):
    """The checkpoint holds the eval-mode (averaged) weights: x = the train-mode y moved towards z by 1 - 1/beta1."""
    from safetensors.torch import load_file

    from dreambooth.models.components import load_components

    settings = make_settings(
        output_dir=str(tmp_path / "free"), optimizer="adamw_schedule_free", learning_rate=1e-3, max_train_steps=2
    )
    seen = {}

    class Keep(Trainer):
        def _outputs(self, run):
            optimizer = run.optimizer
            assert optimizer.param_groups[0]["train_mode"]  # the steps ran in train mode
            parameter = next(self.components.unet.parameters())
            y, z = parameter.detach().clone(), optimizer.state[parameter]["z"].clone()
            seen["x"] = torch.lerp(y, z, 1 - 1 / optimizer.param_groups[0]["betas"][0])
            seen["y"] = y
            super()._outputs(run)
            assert not optimizer.param_groups[0]["train_mode"]

    trainer = Keep(settings)
    result = trainer.run()
    name, parameter = next(iter(trainer.components.unet.named_parameters()))
    assert torch.allclose(parameter.detach(), seen["x"], atol=1e-7)  # the modules after the run: averaged
    assert not torch.allclose(seen["x"], seen["y"])
    saved = load_components(str(result.checkpoints[-1]))
    assert torch.equal(dict(saved.unet.named_parameters())[name].detach(), parameter.detach())
    state = load_file(str(result.state_dir / "unet.safetensors"))
    assert torch.equal(state[name], parameter.detach())
