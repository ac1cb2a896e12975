"""The loss is a pure function: prior term present and weighted, epsilon and v targets, split by mask."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from dreambooth.train.loss import dreambooth_loss, training_target


def test_prior_term_is_present_and_scaled():
    prediction = torch.zeros(4, 4, 2, 2)
    target = torch.stack([torch.full((4, 2, 2), v) for v in (1.0, 2.0, 3.0, 4.0)])
    is_prior = torch.tensor([False, False, True, True])
    for weight in (0.0, 0.5, 1.0, 3.0):
        total, instance, prior = dreambooth_loss(prediction, target, is_prior, weight)
        assert instance.item() == pytest.approx((1 + 4) / 2)
        assert prior.item() == pytest.approx((9 + 16) / 2)
        assert total.item() == pytest.approx(2.5 + weight * 12.5)


def test_split_follows_the_mask_not_the_batch_order():
    """Interleaved instance/class samples (as any sampler may produce) are split by the mask."""
    prediction = torch.zeros(4, 1, 1, 1)
    target = torch.tensor([1.0, 3.0, 1.0, 3.0]).view(4, 1, 1, 1)
    interleaved = torch.tensor([False, True, False, True])
    _, instance, prior = dreambooth_loss(prediction, target, interleaved, 1.0)
    assert (instance.item(), prior.item()) == (1.0, 9.0)
    # the naive "first half instance, second half prior" split would give 5.0 and 5.0
    assert instance.item() != torch.nn.functional.mse_loss(prediction[:2], target[:2]).item()


def test_without_class_images_the_prior_is_none():
    total, instance, prior = dreambooth_loss(torch.zeros(2, 1), torch.ones(2, 1), torch.tensor([False, False]), 1.0)
    assert prior is None and total.item() == instance.item() == 1.0


def test_loss_is_computed_in_fp32():
    prediction = torch.full((2, 4), 1000.0, dtype=torch.float16)
    target = torch.full((2, 4), -1000.0, dtype=torch.float16)
    total, _, _ = dreambooth_loss(prediction, target, torch.tensor([False, False]), 1.0)
    assert total.dtype == torch.float32 and torch.isfinite(total)  # 2000**2 overflows fp16


def test_epsilon_target_is_the_noise_and_v_target_is_the_velocity():
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10, 900])
    epsilon = DDPMScheduler(prediction_type="epsilon")
    assert torch.equal(training_target(epsilon, latents, noise, timesteps), noise)
    v = DDPMScheduler(prediction_type="v_prediction")
    alphas = v.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alphas.sqrt() * noise - (1 - alphas).sqrt() * latents
    torch.testing.assert_close(training_target(v, latents, noise, timesteps), expected)
    with pytest.raises(ValueError, match="unsupported prediction type"):
        training_target(DDPMScheduler(prediction_type="sample"), latents, noise, timesteps)
