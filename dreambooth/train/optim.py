"""Optimizers and learning-rate schedules.

AdamW is torch's, fused when this torch and device support it (detected at run time: the WebUI's torch may be
older than the one we test with); 8-bit AdamW is bitsandbytes', tried on the device first (a one-step probe) so that a
device it cannot run on gets a clear error before training.  With ``fused_backward`` or ``full_bf16`` the optimizer
steps parameter by parameter (train/paramwise.py).  Schedules come from ``diffusers.optimization.get_scheduler``.
"""

from __future__ import annotations

from typing import Any

from ..compat import quiet_bitsandbytes
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
        eight_bit = _adamw_8bit_class(device)

        def build(groups: list[dict[str, Any]]) -> Any:
            return eight_bit(groups, **common)

    else:
        fused = {"fused": True} if supports_fused_adamw(device) else {}

        def build(groups: list[dict[str, Any]]) -> Any:
            return torch.optim.AdamW(groups, **fused, **common)

    if settings.fused_backward or settings.full_bf16:
        from .paramwise import ParamwiseOptimizer

        return ParamwiseOptimizer(
            param_groups,
            build,
            fused=settings.fused_backward,
            max_grad_norm=settings.max_grad_norm,
            round_seed=settings.seed if settings.full_bf16 else None,
        )
    return build(param_groups)


def _adamw_8bit_class(device: Any) -> Any:
    """bitsandbytes' AdamW8bit, after one probe step on ``device`` (8-bit states: a tensor of 4096 values)."""
    import torch

    try:
        with quiet_bitsandbytes():
            import bitsandbytes as bnb
    except Exception as error:  # ImportError, or a broken native library
        raise DreamBoothError(
            f"optimizer adamw_8bit needs bitsandbytes, which cannot be imported ({error}). Install it with "
            "'pip install bitsandbytes', or choose optimizer adamw."
        ) from error
    device = torch.device(device)
    try:
        probe = torch.nn.Parameter(torch.ones(4096, device=device))
        probe.grad = torch.ones_like(probe)
        bnb.optim.AdamW8bit([probe], lr=1e-3).step()
    except Exception as error:  # no kernel for this device in this bitsandbytes build
        raise DreamBoothError(
            f"optimizer adamw_8bit: bitsandbytes {getattr(bnb, '__version__', '')} cannot run 8-bit AdamW on the "
            f"{device.type} device ({type(error).__name__}: {error}). Update bitsandbytes, or choose optimizer adamw."
        ) from error
    return bnb.optim.AdamW8bit


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
