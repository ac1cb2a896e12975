"""Optimizers and learning-rate schedules.

AdamW is torch's, fused when this torch and device support it (detected at run time: the WebUI's torch may be
older than the one we test with); 8-bit AdamW and 8-bit Lion are bitsandbytes', tried on the device first (a one-step
probe) so that a device they cannot run on gets a clear error before training; the others come from their libraries
(train/optimizers.py).  With ``fused_backward`` or ``full_bf16`` the optimizer
steps parameter by parameter (train/paramwise.py).  Schedules come from ``diffusers.optimization.get_scheduler``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from ..compat import quiet_bitsandbytes
from ..errors import DreamBoothError
from .optimizers import builder

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


def make_optimizer(
    param_groups: list[dict[str, Any]],
    settings: Any,
    device: Any,
    construct: Callable[[], Any] = contextlib.nullcontext,
) -> Any:
    """The optimizer the settings ask for, over ``param_groups`` (each with its own ``lr``).

    ``construct``: a context in which optimizer objects are built and bitsandbytes is probed (the memory dry run
    builds them outside its fake-tensor mode: bitsandbytes computes its quantisation maps from real numbers).
    """
    import torch

    common = {
        "betas": (settings.adam_beta1, settings.adam_beta2),
        "eps": settings.adam_epsilon,
        "weight_decay": settings.adam_weight_decay,
    }
    other = builder(settings)
    if settings.optimizer in EIGHT_BIT:
        with construct():
            eight_bit = _eight_bit_class(settings.optimizer, device)
        if settings.optimizer == "lion_8bit":  # Lion has no epsilon
            common.pop("eps")

        def build(groups: list[dict[str, Any]]) -> Any:
            with construct():
                return eight_bit(groups, **common)

    elif other is not None:
        build = other
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


# optimizer -> (bitsandbytes class, its name in messages)
EIGHT_BIT = {"adamw_8bit": ("AdamW8bit", "8-bit AdamW"), "lion_8bit": ("Lion8bit", "8-bit Lion")}


def _eight_bit_class(name: str, device: Any) -> Any:
    """bitsandbytes' 8-bit AdamW or Lion, after one probe step on ``device`` (8-bit states: a tensor of 4096
    values)."""
    import torch

    class_name, words = EIGHT_BIT[name]
    try:
        with quiet_bitsandbytes():
            import bitsandbytes as bnb
    except Exception as error:  # ImportError, or a broken native library
        raise DreamBoothError(
            f"optimizer {name} needs bitsandbytes, which cannot be imported ({error}). Install it with "
            "'pip install bitsandbytes', or choose optimizer adamw."
        ) from error
    device = torch.device(device)
    optimizer_class = getattr(bnb.optim, class_name)
    try:
        probe = torch.nn.Parameter(torch.ones(4096, device=device))
        probe.grad = torch.ones_like(probe)
        optimizer_class([probe], lr=1e-3).step()
    except Exception as error:  # no kernel for this device in this bitsandbytes build
        raise DreamBoothError(
            f"optimizer {name}: bitsandbytes {getattr(bnb, '__version__', '')} cannot run {words} on the "
            f"{device.type} device ({type(error).__name__}: {error}). Update bitsandbytes, or choose optimizer adamw."
        ) from error
    return optimizer_class


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
