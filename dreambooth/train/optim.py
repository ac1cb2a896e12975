"""Optimizers and learning-rate schedules.

AdamW is torch's, fused when this torch and device support it (detected at run time: the WebUI's torch may be
older than the one we test with); 8-bit AdamW is bitsandbytes', with a clear error before training when it cannot run
on the device.  Schedules come from ``diffusers.optimization.get_scheduler``.
"""

from __future__ import annotations

from typing import Any

from ..errors import DreamBoothError

# diffusers' "cosine_with_restarts" is the hard-restart cosine; the guide's two names mean the same schedule.
SCHEDULER_NAMES = {"cosine_with_hard_restarts": "cosine_with_restarts"}


def supports_fused_adamw(device: Any) -> bool:
    import torch

    try:
        probe = torch.nn.Parameter(torch.zeros(1, device=device))
        torch.optim.AdamW([probe], fused=True)
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def make_optimizer(param_groups: list[dict[str, Any]], settings: Any, device: Any) -> Any:
    """The optimizer the settings ask for, over ``param_groups`` (each with its own ``lr``)."""
    import torch

    common = {
        "betas": (settings.adam_beta1, settings.adam_beta2),
        "eps": settings.adam_epsilon,
        "weight_decay": settings.adam_weight_decay,
    }
    if settings.optimizer == "adamw_8bit":
        return _adamw_8bit(param_groups, common, device)
    if supports_fused_adamw(device):
        return torch.optim.AdamW(param_groups, fused=True, **common)
    return torch.optim.AdamW(param_groups, **common)


def _adamw_8bit(param_groups: list[dict[str, Any]], common: dict[str, Any], device: Any) -> Any:
    import torch

    try:
        import bitsandbytes as bnb
    except Exception as error:  # ImportError, or a broken native library
        raise DreamBoothError(
            f"optimizer adamw_8bit needs bitsandbytes, which cannot be imported ({error}). Install it with "
            "'pip install bitsandbytes' on a machine with a CUDA GPU, or choose optimizer adamw."
        ) from error
    device = torch.device(device)
    if device.type != "cuda":
        raise DreamBoothError(
            f"optimizer adamw_8bit (bitsandbytes) has no backend for the {device.type} device in this setup: "
            "8-bit AdamW needs a CUDA GPU. Choose optimizer adamw to train on the CPU."
        )
    return bnb.optim.AdamW8bit(param_groups, **common)


def make_lr_scheduler(optimizer: Any, settings: Any, total_steps: int) -> Any:
    from diffusers.optimization import get_scheduler

    name = SCHEDULER_NAMES.get(settings.lr_scheduler, settings.lr_scheduler)
    return get_scheduler(
        name,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps,
        num_training_steps=total_steps,
        num_cycles=settings.lr_cycles,
        power=settings.lr_power,
    )
