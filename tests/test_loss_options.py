"""Loss weighting and noise (issue 16): each term's math against a hand-computed example, then its effect in a run.

Pure functions (train/loss.py): Min-SNR weights, debiased estimation, the Huber / smooth-L1 losses and the schedule
of their c, offset noise.  In the trainer (train/noising.py, train/loop.py): the drawn timestep range, the offset
noise's per-channel mean shift, input perturbation (input noise differs from the target's), zero terminal SNR (the
last alpha-bar is 0; samples use trailing timesteps), and exact resume with these options on.
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth.train.loop import Trainer
from dreambooth.train.loss import (
    debiased_weights,
    huber_c_schedule,
    min_snr_weights,
    offset_noise,
    sample_losses,
    signal_to_noise,
)

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000}


# ------------------------------------------------------------------------------------------- pure functions


def test_signal_to_noise_is_alpha_bar_over_one_minus_alpha_bar():
    alphas_cumprod = torch.tensor([0.8, 0.5, 0.2, 0.0])
    snr = signal_to_noise(alphas_cumprod, torch.tensor([0, 1, 2, 3]))
    assert snr.tolist() == pytest.approx([4.0, 1.0, 0.25, 0.0])


def test_min_snr_weights_epsilon_and_v_prediction():
    snr = torch.tensor([20.0, 5.0, 1.0, 0.25, 0.0])
    # epsilon: min(snr, 5) / snr -> 5/20, 5/5, 1/1, 0.25/0.25, and 1 at snr 0 (the limit, not 0/0)
    assert min_snr_weights(snr, 5.0, "epsilon").tolist() == pytest.approx([0.25, 1.0, 1.0, 1.0, 1.0])
    # v-prediction: min(snr, 5) / (snr + 1) -> 5/21, 5/6, 1/2, 0.25/1.25, 0
    assert min_snr_weights(snr, 5.0, "v_prediction").tolist() == pytest.approx([5 / 21, 5 / 6, 0.5, 0.2, 0.0])


def test_debiased_weights_cap_the_snr_at_1000_and_the_weight_at_1000():
    snr = torch.tensor([4.0, 0.25, 4000.0, 0.0])
    assert debiased_weights(snr, "epsilon").tolist() == pytest.approx([0.5, 2.0, 1 / math.sqrt(1000), 1000.0])
    assert debiased_weights(snr, "v_prediction").tolist() == pytest.approx(
        [1 / math.sqrt(5), 1 / math.sqrt(1.25), 1 / math.sqrt(1001), 1.0]
    )


def test_huber_and_smooth_l1_losses_by_hand():
    prediction = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[3.0, 0.0]]], [[[4.0, 0.0]]]])
    c = torch.tensor([4.0, 3.0])  # one c per sample
    # sample 0: d = 3, 0 with c = 4: sqrt(9 + 16) - 4 = 1 and 0; sample 1: d = 4, 0 with c = 3: sqrt(25) - 3 = 2, 0
    assert sample_losses(prediction, target, "huber", c).tolist() == pytest.approx([2 * 4 * 1 / 2, 2 * 3 * 2 / 2])
    assert sample_losses(prediction, target, "smooth_l1", c).tolist() == pytest.approx([2 * 1 / 2, 2 * 2 / 2])
    assert sample_losses(prediction, target, "l2").tolist() == pytest.approx([9 / 2, 16 / 2])


def test_huber_c_schedules_by_hand():
    alphas_cumprod = torch.tensor([0.8, 0.2, 0.0])
    steps = torch.tensor([0, 1, 2])
    assert huber_c_schedule(0.1, "constant", steps, alphas_cumprod, 2).tolist() == pytest.approx([0.1] * 3)
    # exponential: exp(-t ln(1/c) / T) with T = 2: 1, sqrt(c), c
    assert huber_c_schedule(0.1, "exponential", steps, alphas_cumprod, 2).tolist() == pytest.approx(
        [1.0, math.sqrt(0.1), 0.1]
    )
    # snr: sigma = sqrt((1 - a) / a) = 0.5, 2, inf -> (1 - c) / (1 + sigma)^2 + c = 0.9/2.25 + 0.1, 0.9/9 + 0.1, c
    assert huber_c_schedule(0.1, "snr", steps, alphas_cumprod, 2).tolist() == pytest.approx([0.5, 0.2, 0.1])


def test_offset_noise_moves_each_channel_mean_by_strength_times_its_offset():
    noise = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    offset = torch.tensor([1.0, -2.0, 0.5, 0.0]).view(4, 1, 1)
    shifted = offset_noise(noise, offset, 0.1)
    shift = (shifted - noise).mean(dim=(1, 2))
    assert shift.tolist() == pytest.approx([0.1, -0.2, 0.05, 0.0], abs=1e-6)
    assert torch.allclose(shifted - noise, (0.1 * offset).expand(4, 8, 8))  # the same over H x W


# ------------------------------------------------------------------------------------------- in the trainer


class Recording(Trainer):
    """Keeps each step's UNet inputs, timesteps and loss targets (wrapping the scheduler's add_noise and the UNet)."""

    def _load(self, device):
        components = super()._load(device)
        self.seen = []
        unet_forward = components.unet.forward

        def forward(sample, timestep, *args, **kwargs):
            self.seen.append({"input": sample.detach().clone(), "timesteps": timestep.detach().clone()})
            return unet_forward(sample, timestep, *args, **kwargs)

        components.unet.forward = forward
        return components


def draws(make_settings, tmp_path, name, **changes):
    trainer = Recording(make_settings(output_dir=str(tmp_path / name), save_training_state=False, **changes))
    trainer.run()
    return trainer


def test_timesteps_are_drawn_in_the_range(make_settings, tmp_path):
    trainer = draws(make_settings, tmp_path, "range", min_timestep=200, max_timestep=203, max_train_steps=4)
    steps = torch.cat([x["timesteps"] for x in trainer.seen]).tolist()
    assert set(steps) <= {200, 201, 202} and len(steps) == 4


@pytest.mark.slow
def test_noise_offset_and_input_perturbation_change_the_input_as_stated(make_settings, tmp_path):
    """The same latents, timesteps and plain noise (drawn first): the UNet input differs by exactly
    sqrt(1 - alpha-bar_t) x (offset x N(0,1) per channel, constant over H x W)."""
    plain = draws(make_settings, tmp_path, "plain", max_train_steps=1)
    offset = draws(make_settings, tmp_path, "offset", max_train_steps=1, noise_offset=0.1)
    a, b = plain.seen[0], offset.seen[0]
    assert torch.equal(a["timesteps"], b["timesteps"])
    scheduler = plain.components.noise_scheduler
    sigma = torch.sqrt(1 - scheduler.alphas_cumprod[a["timesteps"]]).view(-1, 1, 1, 1)
    shift = (b["input"] - a["input"]) / sigma / 0.1  # the per-channel N(0,1) offsets
    per_channel = shift.mean(dim=(2, 3), keepdim=True)
    assert torch.allclose(shift, per_channel.expand_as(shift), atol=1e-4)  # constant over H x W
    assert per_channel.abs().min() > 1e-3  # every channel moved

    # random strength: the same offsets (drawn first) times one U(0, 1) factor per image
    random = draws(
        make_settings, tmp_path, "random", max_train_steps=1, noise_offset=0.1, noise_offset_random_strength=True
    )
    ratio = (random.seen[0]["input"] - a["input"]) / (b["input"] - a["input"])
    factor = float(ratio.flatten()[0])
    assert 0 < factor < 1 and torch.allclose(ratio, torch.full_like(ratio, factor), atol=1e-3)

    # input perturbation: the input moves by sigma x 0.1 x N(0,1) per element; the loss target does not
    perturbed = draws(make_settings, tmp_path, "perturbed", max_train_steps=1, input_perturbation=0.1)
    c = perturbed.seen[0]
    spread = ((c["input"] - a["input"]) / sigma / 0.1).std()
    assert 0.7 < float(spread) < 1.3


def test_input_perturbation_keeps_the_target(monkeypatch, make_settings, tmp_path):
    from dreambooth.train import loop

    targets = []
    original = loop.training_target

    def record(scheduler, latents, noise, timesteps):
        targets.append(noise.clone())
        return original(scheduler, latents, noise, timesteps)

    monkeypatch.setattr(loop, "training_target", record)
    draws(make_settings, tmp_path, "plain", max_train_steps=1)
    draws(make_settings, tmp_path, "perturbed", max_train_steps=1, input_perturbation=0.5)
    assert torch.equal(targets[0], targets[1])


def test_zero_terminal_snr_rescales_the_schedule_and_the_samples_use_trailing_steps():
    from dreambooth.train.noising import zero_terminal_snr_scheduler
    from dreambooth.train.sampling import _sampling_scheduler

    base = DDPMScheduler(**SD, prediction_type="v_prediction")
    rescaled = zero_terminal_snr_scheduler(base)
    assert base.alphas_cumprod[-1] > 0.004 and rescaled.alphas_cumprod[-1] == 0.0
    assert rescaled.alphas_cumprod[0] == pytest.approx(float(base.alphas_cumprod[0]), abs=1e-3)
    components = types.SimpleNamespace(noise_scheduler=base)
    sampler = _sampling_scheduler(components, zero_terminal_snr=True)
    sampler.set_timesteps(4)
    assert sampler.timesteps.tolist() == [999, 749, 499, 249]  # trailing: the first step is the pure-noise one
    assert sampler.alphas_cumprod[-1] == 0.0
    plain = _sampling_scheduler(components)
    plain.set_timesteps(4)
    assert plain.timesteps[0] < 999 and plain.alphas_cumprod[-1] > 0


@pytest.mark.slow
def test_zero_terminal_snr_trains_the_last_timestep_from_pure_noise(make_settings, tmp_path):
    """At t=999 the rescaled schedule keeps nothing of the latent: two different images give the same UNet input
    (the noise, drawn from the same seed); the model's own schedule keeps sqrt(0.0047) of the latent."""
    from conftest import draw_subject

    other = tmp_path / "other"
    draw_subject(other, count=3, size=(96, 64), seed=5)
    inputs = {}
    for rescale in (True, False):
        for folder in ("instance", "other"):
            trainer = draws(
                make_settings,
                tmp_path,
                f"{rescale}-{folder}",
                concept={"instance_data_dir": str(tmp_path / folder)},
                max_train_steps=1,
                min_timestep=999,
                zero_terminal_snr=rescale,
            )
            inputs[rescale, folder] = trainer.seen[0]["input"]
    assert torch.equal(inputs[True, "instance"], inputs[True, "other"])
    assert not torch.equal(inputs[False, "instance"], inputs[False, "other"])


def test_zero_terminal_snr_samples_of_a_v_model_are_made_from_pure_noise(make_settings, tiny_checkpoint, tmp_path):
    import numpy as np
    from PIL import Image

    from dreambooth.train import sampling

    used = []
    original = sampling._sampling_scheduler

    def record(components, zero_terminal_snr=False):
        used.append(original(components, zero_terminal_snr))
        return used[-1]

    settings = make_settings(
        pretrained_model_name_or_path=str(tiny_checkpoint("sd2-v")),
        output_dir=str(tmp_path / "v"),
        max_train_steps=1,
        zero_terminal_snr=True,
        n_save_sample=1,
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sampling, "_sampling_scheduler", record)
        Trainer(settings).run()
    assert used[0].config.timestep_spacing == "trailing" and used[0].alphas_cumprod[-1] == 0.0
    assert used[0].timesteps[0] == 999
    (sample,) = (tmp_path / "v" / "samples").rglob("*.png")
    assert np.asarray(Image.open(sample)).std() > 0  # a picture, not NaN turned black


def test_zero_terminal_snr_with_an_epsilon_model_is_warned(make_settings):
    from dreambooth.validation import training_warnings

    settings = make_settings(zero_terminal_snr=True)
    epsilon = types.SimpleNamespace(family="sd1", is_v_prediction=False, prediction_type="epsilon")
    found = [w for w in training_warnings(settings, epsilon) if "zero_terminal_snr" in w]
    assert len(found) == 1 and "needs a v-prediction model" in found[0]
    v_model = types.SimpleNamespace(family="sd2", is_v_prediction=True, prediction_type="v_prediction")
    assert not [w for w in training_warnings(settings, v_model) if "zero_terminal_snr" in w]


@pytest.mark.slow
def test_min_snr_and_huber_weigh_the_reported_loss(make_settings, tmp_path):
    """The reported loss of one sample at a known timestep is the l2 loss times min(SNR, gamma) / SNR."""
    from dreambooth.events import Callbacks

    class Losses(Callbacks):
        def __init__(self):
            self.values = []

        def on_progress(self, progress):
            if progress.phase == "training":
                self.values.append(progress.loss)

    def loss(**changes):
        recorder = Losses()
        settings = make_settings(
            output_dir=str(tmp_path / str(len(changes))), max_train_steps=1, min_timestep=10, max_timestep=11
        )
        Trainer(dataclasses.replace(settings, save_training_state=False, **changes), callbacks=recorder).run()
        return recorder.values[0]

    plain = loss()
    weighted = loss(min_snr_gamma=1.0)
    scheduler = DDPMScheduler(**SD)
    snr = float(scheduler.alphas_cumprod[10] / (1 - scheduler.alphas_cumprod[10]))
    assert snr > 1  # t=10 is low noise: the weight is gamma / snr
    assert weighted == pytest.approx(plain * 1.0 / snr, rel=1e-5)
    assert loss(debiased_estimation=True) == pytest.approx(plain / math.sqrt(snr), rel=1e-5)
    assert loss(loss_type="huber", huber_schedule="constant", huber_c=0.1) < plain  # pseudo-Huber <= l2 there


def test_timestep_range_outside_the_schedule_is_refused(make_settings):
    problems = make_settings(min_timestep=500, max_timestep=400).validate()
    assert any("min_timestep 500" in p and "max_timestep 400" in p for p in problems)


@pytest.mark.slow
def test_resume_with_loss_options_is_exact(make_settings, tmp_path):
    from dreambooth.events import Callbacks, Commands

    common = {
        "max_train_steps": 4,
        "noise_offset": 0.1,
        "noise_offset_random_strength": True,
        "input_perturbation": 0.1,
        "min_snr_gamma": 5.0,
        "loss_type": "huber",
        "min_timestep": 100,
        "zero_terminal_snr": True,
    }
    straight = Trainer(make_settings(output_dir=str(tmp_path / "straight"), **common))
    straight.run()

    class CancelAtTwo(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == 2:
                commands.cancel()

    commands = Commands()
    interrupted = Trainer(
        make_settings(output_dir=str(tmp_path / "split"), **common), callbacks=CancelAtTwo(), commands=commands
    ).run()
    assert interrupted.cancelled and interrupted.step == 2
    resumed = Trainer(
        make_settings(output_dir=str(tmp_path / "split"), resume_from=str(interrupted.state_dir), **common)
    )
    assert resumed.run().step == 4
    a, b = straight.components.unet.state_dict(), resumed.components.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
