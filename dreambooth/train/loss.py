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


def sample_losses(prediction: Any, target: Any) -> Any:
    """Mean squared error of each sample (one value per batch entry), in fp32 whatever the prediction dtype."""
    return ((prediction.float() - target.float()) ** 2).flatten(1).mean(dim=1)


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
