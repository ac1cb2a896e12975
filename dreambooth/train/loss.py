"""The DreamBooth loss, as small pure functions.

noise -> add_noise -> predict -> target by prediction type -> split instance / prior by an explicit mask ->
instance loss + prior_loss_weight x prior loss.  The mask (not the batch position) says which samples are class
images, so the split is right whatever order a sampler produces.
"""

from __future__ import annotations

from typing import Any


def training_target(scheduler: Any, latents: Any, noise: Any, timesteps: Any) -> Any:
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction)."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction type {prediction_type!r} (epsilon or v_prediction)")


def masked_mean(per_element: Any, weights: Any = None) -> Any:
    """Each sample's mean of ``per_element`` (B, C, H, W), weighted by ``weights`` (B, 1, H, W, in [0, 1]; None: the
    plain mean): sum(loss x weight) / sum(weight) over the sample, so an all-ones weight gives exactly the plain mean
    and a sample's loss keeps its scale whatever share of it is masked (its balance with the prior term too).  A
    sample whose weights are all 0 has loss 0 (and gradient 0), not 0/0."""
    if weights is None:
        return per_element.flatten(1).mean(dim=1)
    import torch

    weights = weights.to(per_element.device, per_element.dtype)
    weighted = (per_element * weights).flatten(1).mean(dim=1)
    share = weights.flatten(1).mean(dim=1)  # mean weight per element: the same over channels
    return weighted / torch.clamp(share, min=torch.finfo(share.dtype).tiny)


def sample_losses(prediction: Any, target: Any, loss_type: str = "l2", huber_c: Any = None, weights: Any = None) -> Any:
    """The mean loss of each sample (one value per batch entry), in fp32 whatever the prediction dtype.

    ``loss_type``: l2 (squared error), huber (pseudo-Huber 2c(sqrt(d² + c²) - c)) or smooth_l1 (2(sqrt(d² + c²) -
    c)), the forms of kohya's sd-scripts; ``huber_c``: c, one value per sample (a tensor) or one number;
    ``weights``: a per-element weight (B, 1, H, W) of the masked loss, see :func:`masked_mean` (None: none).
    """
    difference = prediction.float() - target.float()
    if loss_type == "l2":
        return masked_mean(difference**2, weights)
    import torch

    c = torch.as_tensor(huber_c, dtype=torch.float32, device=difference.device)
    c = c.reshape(-1, *([1] * (difference.dim() - 1))) if c.dim() else c
    smooth = torch.sqrt(difference**2 + c**2) - c
    if loss_type == "huber":
        smooth = 2 * c * smooth
    elif loss_type == "smooth_l1":
        smooth = 2 * smooth
    else:
        raise ValueError(f"unknown loss type {loss_type!r} (l2, huber or smooth_l1)")
    return masked_mean(smooth, weights)


def signal_to_noise(alphas_cumprod: Any, timesteps: Any) -> Any:
    """SNR of each timestep: alpha-bar / (1 - alpha-bar) (0 at a zero-terminal-SNR schedule's last timestep)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(snr: Any, gamma: float, prediction_type: str) -> Any:
    """Min-SNR weights (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, min(SNR, gamma) / (SNR + 1) for
    v-prediction.  Written min(1, gamma / SNR) for epsilon, which is 1 where SNR is 0 (the limit), not 0/0."""
    import torch

    if prediction_type == "v_prediction":
        return torch.clamp(snr, max=gamma) / (snr + 1)
    return torch.clamp(gamma / snr, max=1.0)


DEBIASED_SNR_CAP = 1000.0  # kohya's cap of the SNR (the weight stays >= 1 / sqrt(1000))


def debiased_weights(snr: Any, prediction_type: str) -> Any:
    """Debiased-estimation weights (as kohya's sd-scripts): 1 / sqrt(min(SNR, 1000)) for epsilon, 1 / sqrt(min(SNR,
    1000) + 1) for v-prediction; an epsilon weight at SNR 0 (zero terminal SNR) is capped at 1000, not infinite."""
    import torch

    snr = torch.clamp(snr, max=DEBIASED_SNR_CAP)
    if prediction_type == "v_prediction":
        return 1 / torch.sqrt(snr + 1)
    return torch.clamp(1 / torch.sqrt(snr), max=DEBIASED_SNR_CAP)


def huber_c_schedule(c: float, schedule: str, timesteps: Any, alphas_cumprod: Any, num_train_timesteps: int) -> Any:
    """c of each sample's huber / smooth_l1 loss (kohya's sd-scripts and diffusers' training scripts):
    constant: c; exponential: exp(-t ln(1/c) / T), 1 at t=0 down to c at t=T; snr: (1 - c) / (1 + sigma_t)² + c
    with sigma_t = sqrt((1 - alpha-bar_t) / alpha-bar_t) (c itself where alpha-bar is 0)."""
    import math

    import torch

    if schedule == "constant":
        return torch.full(timesteps.shape, c, dtype=torch.float32, device=timesteps.device)
    if schedule == "exponential":
        return torch.exp(-math.log(1 / c) / num_train_timesteps * timesteps.float())
    if schedule == "snr":
        alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
        sigma = torch.sqrt((1 - alpha_bar) / alpha_bar)
        return (1 - c) / (1 + sigma) ** 2 + c
    raise ValueError(f"unknown huber schedule {schedule!r} (constant, exponential or snr)")


def offset_noise(noise: Any, offset: Any, strength: Any) -> Any:
    """Noise with an offset: ``noise`` (C, H, W) + ``strength`` x ``offset`` (C, 1, 1, one N(0, 1) value per
    channel), so each channel's mean moves by strength x its offset (kohya's and Guttenberg's noise offset)."""
    return noise + strength * offset


def loss_weights(snr: Any, prediction_type: str, min_snr_gamma: float, debiased: bool) -> Any:
    """The product of the per-sample weights asked for (Min-SNR, debiased estimation), or None when neither."""
    weights = None
    if min_snr_gamma > 0:
        weights = min_snr_weights(snr, min_snr_gamma, prediction_type)
    if debiased:
        debiased_part = debiased_weights(snr, prediction_type)
        weights = debiased_part if weights is None else weights * debiased_part
    return weights


def combine_losses(
    per_sample: Any, is_prior: Any, prior_loss_weight: float, counts: tuple[int, int] | None = None
) -> tuple[Any, Any, Any]:
    """(total, instance, prior) from per-sample losses; ``is_prior`` is a bool tensor with one entry per sample.

    ``counts``: the (instance, class) samples of the whole step when these are one process's share of it; the sums
    are divided by those, so the processes' losses add up to the step's.  Default: this batch's own counts (means).
    ``prior`` is ``None`` when the step has no class image.
    """
    import torch

    is_prior = is_prior.to(per_sample.device, torch.bool)
    if counts is None:
        counts = (int((~is_prior).sum()), int(is_prior.sum()))
    # Masked sums, not boolean indexing: the same values, and shapes that do not depend on the data, so the memory
    # estimate's dry run (fake tensors, memory/dryrun.py) runs this very code.
    instance = per_sample.masked_fill(is_prior, 0.0).sum() / counts[0]
    if not counts[1]:
        return instance, instance, None
    prior = per_sample.masked_fill(~is_prior, 0.0).sum() / counts[1]
    return instance + prior_loss_weight * prior, instance, prior


def dreambooth_loss(prediction: Any, target: Any, is_prior: Any, prior_loss_weight: float) -> tuple[Any, Any, Any]:
    """(total, instance, prior) mean-squared errors of one batch: :func:`sample_losses` then :func:`combine_losses`."""
    return combine_losses(sample_losses(prediction, target), is_prior, prior_loss_weight)
