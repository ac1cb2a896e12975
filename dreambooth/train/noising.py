"""What a training step draws and weighs besides the plain DreamBooth loss: the timestep range, offset noise, input
perturbation, zero terminal SNR, the per-sample loss weights and the Huber loss's c (the math: train/loss.py).

Every draw comes from the sample's own generator, after the draws every run makes (latent sample, noise, timestep),
and only when its setting is on: a run without these options draws exactly what it drew before they existed, and
resume stays exact (the generators are seeded by (seed, sample index)).
"""

from __future__ import annotations

from typing import Any

from ..errors import DreamBoothError
from .loss import huber_c_schedule, loss_weights, offset_noise, sample_losses, signal_to_noise


def zero_terminal_snr_scheduler(scheduler: Any) -> Any:
    """A copy of the training scheduler with its betas rescaled to zero terminal SNR (diffusers'
    ``rescale_zero_terminal_snr``, which its DDPM scheduler applies with ``rescale_betas_zero_snr``): the last
    alpha-bar is 0, so the last timestep is pure noise."""
    return type(scheduler).from_config(scheduler.config, rescale_betas_zero_snr=True)


def sampling_scheduler_options(zero_terminal_snr: bool) -> dict[str, Any]:
    """Options of the sampling scheduler for a model trained with zero terminal SNR: the same rescaled schedule,
    and timesteps spaced from the last one ("trailing"), so sampling starts from pure noise (Lin et al. 2023)."""
    if not zero_terminal_snr:
        return {}
    return {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"}


def timestep_range(settings: Any, scheduler: Any) -> tuple[int, int]:
    """(low, high): training timesteps are drawn from low to high - 1 (``min_timestep``, ``max_timestep``)."""
    total = scheduler.config.num_train_timesteps
    high = total if settings.max_timestep is None else settings.max_timestep
    if high > total or settings.min_timestep >= high:
        raise DreamBoothError(
            f"min_timestep {settings.min_timestep} and max_timestep {settings.max_timestep} leave no timestep of this "
            f"model's {total}: choose 0 <= min_timestep < max_timestep <= {total}"
        )
    return settings.min_timestep, high


def draw_noise(settings: Any, noise: Any, generator: Any) -> tuple[Any, Any]:
    """(target noise, input noise) of one sample from its plain ``noise`` (C, H, W): the offset noise is both the
    target and the input; input perturbation adds to the input only."""
    import torch

    if settings.noise_offset > 0:
        offset = torch.randn((noise.shape[0], 1, 1), generator=generator)
        strength = settings.noise_offset
        if settings.noise_offset_random_strength:
            strength = strength * torch.rand((1, 1, 1), generator=generator)
        noise = offset_noise(noise, offset, strength)
    model_input = noise
    if settings.input_perturbation > 0:
        model_input = noise + settings.input_perturbation * torch.randn(noise.shape, generator=generator)
    return noise, model_input


def weighted_sample_losses(
    settings: Any, scheduler: Any, prediction: Any, target: Any, timesteps: Any, masks: Any = None
) -> Any:
    """Each sample's loss (``loss_type``, with the Huber c of its timestep; weighted per element by ``masks``, the
    masked loss's (B, 1, H, W) weights, or None) times its weight (Min-SNR, debiased estimation), one value per
    sample."""
    c = None
    if settings.loss_type != "l2":
        c = huber_c_schedule(
            settings.huber_c,
            settings.huber_schedule,
            timesteps,
            scheduler.alphas_cumprod,
            scheduler.config.num_train_timesteps,
        )
    losses = sample_losses(prediction, target, settings.loss_type, c, masks)
    if settings.min_snr_gamma <= 0 and not settings.debiased_estimation:
        return losses
    snr = signal_to_noise(scheduler.alphas_cumprod, timesteps)
    weights = loss_weights(snr, scheduler.config.prediction_type, settings.min_snr_gamma, settings.debiased_estimation)
    return losses * weights
