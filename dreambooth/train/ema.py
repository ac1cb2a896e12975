"""An exponential moving average (EMA) of the trained weights (``use_ema``): used for samples, tests and the saved
output, kept in the resumable state.

What is averaged: the parameters the optimizer trains (a full fine-tune: the UNet, and the text encoder when it
trains; LoRA / LoHa / LoKr: the adapter's parameters only), in fp32, on the training device or (``ema_on_cpu``) in
CPU memory.  It is updated every ``ema_update_every`` optimizer steps; the k-th update (k = 1, 2, ...) is

    ema <- ema + (1 - d_k) * (weights - ema),    d_k = min(ema_decay, (1 + t) / (10 + t)),  t = k - 1

so the first update copies the weights (d_1 = 0) and the decay warms up towards ``ema_decay``: diffusers'
``EMAModel`` formula with its defaults (``update_after_step=0``, ``use_ema_warmup=False``, ``min_decay=0``), which
SimpleTuner and OneTrainer users know.  Without the warm-up a decay of 0.9999 would leave a DreamBooth run of a
few thousand steps nearly at the base model.

Why not diffusers' ``EMAModel`` itself: ``diffusers.training_utils`` cannot be imported in the WebUI's environment
(diffusers 0.31 with transformers 4.30.2 fails at import on ``transformers.integrations.deepspeed``); its ``step``
needs the average on the weights' device (no CPU copy) and copies, instead of averaging, parameters that do not
require a gradient.  torch's ``AveragedModel`` deep-copies a module: the adapter's modules hold the base model's
layers, which would be copied with them.  The update here is torch's own ``lerp_``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

EMA_FILE = "ema.safetensors"
TRAINED_SUFFIX = "_trained"  # ema_output both: NAME_STEP_trained.safetensors holds the weights as trained
WARMUP_OFFSET = 10  # d_k = (1 + t) / (10 + t) before it reaches ema_decay (diffusers' EMAModel)
TEXT_PREFIX = "text_model."


def ema_decay_at(update: int, decay: float) -> float:
    """The decay of the ``update``-th update (counting from 1): 0 for the first (a copy), then the warm-up
    ``(1 + t) / (10 + t)`` with ``t = update - 1``, at most ``decay``."""
    t = update - 1
    if t <= 0:
        return 0.0
    return min(decay, (1 + t) / (WARMUP_OFFSET + t))


def trained_parameters(modules: dict[str, Any], groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The optimizer's parameters by a stable name (``module.parameter``; a text encoder's names without the
    ``text_model.`` prefix, which transformers 5 drops)."""
    wanted = {id(p) for g in groups for p in g["params"]}
    named = {}
    for module_name, module in modules.items():
        for name, parameter in module.named_parameters():
            if id(parameter) in wanted:
                if module_name == "text_encoder" and name.startswith(TEXT_PREFIX):
                    name = name[len(TEXT_PREFIX) :]
                named[f"{module_name}.{name}"] = parameter
    return named


class WeightsEMA:
    """The EMA of ``parameters`` (name -> parameter), kept in fp32 on ``device``."""

    def __init__(self, parameters: dict[str, Any], decay: float, update_every: int, device: Any):
        import torch

        self.parameters = parameters
        self.decay = decay
        self.update_every = update_every
        self.device = torch.device(device)
        self.updates = 0  # updates made so far
        self.restarted = False  # resumed from a state without an EMA
        with torch.no_grad():
            self.shadow = {name: p.detach().to(self.device, torch.float32, copy=True) for name, p in parameters.items()}

    def after_step(self, step: int) -> None:
        """Called after optimizer step ``step`` (counting from 1): an update every ``update_every`` steps."""
        if step % self.update_every == 0:
            self.update()

    def update(self) -> None:
        import torch

        self.updates += 1
        weight = 1.0 - ema_decay_at(self.updates, self.decay)
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                average = self.shadow[name]
                average.lerp_(parameter.detach().to(average.device, torch.float32), weight)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The parameters hold the EMA (in their own dtype) inside the block, their trained values again after it,
        bit for bit.  On the training device in fp32 the EMA tensors themselves stand in (no copy); from the CPU
        the trained values wait in CPU memory meanwhile, so the GPU holds one set of weights at a time."""
        import torch

        kept = {}
        with torch.no_grad():
            for name, parameter in self.parameters.items():
                trained = parameter.data
                kept[name] = trained if self.device == trained.device else trained.to("cpu")
                parameter.data = self.shadow[name].to(trained.device, trained.dtype)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    device = self.parameters[name].data.device
                    parameter.data = kept[name].to(device)

    # -------------------------------------------------------------------------------------- state

    def restart(self) -> None:
        """Start again from the parameters' current values, no update made (a resumed state without an EMA)."""
        import torch

        with torch.no_grad():
            for name, parameter in self.parameters.items():
                self.shadow[name].copy_(parameter.detach())
        self.updates = 0
        self.restarted = True

    def state(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(tensors, info) for the resumable state: the averages in fp32 on the CPU, and the update count."""
        tensors = {name: value.detach().cpu().contiguous() for name, value in self.shadow.items()}
        return tensors, {"updates": self.updates, "decay": self.decay, "update_every": self.update_every}

    def load(self, tensors: dict[str, Any], info: dict[str, Any], source: str) -> None:
        """Continue from a saved state; the names must be this run's (else one sentence naming ``source``)."""
        from ..errors import DreamBoothError

        if set(tensors) != set(self.shadow):
            extra = sorted(set(tensors) ^ set(self.shadow))
            raise DreamBoothError(
                f"{source}: the saved EMA is of other weights than these settings train (e.g. {extra[0]}); resume "
                "with the settings the state was trained with."
            )
        for name, value in tensors.items():
            self.shadow[name].copy_(value)
        self.updates = int(info.get("updates", 0))


def make_ema(settings: Any, modules: dict[str, Any], groups: list[dict[str, Any]], device: Any) -> WeightsEMA | None:
    """The run's EMA when ``use_ema`` is on (``device``: where it lives), else None."""
    if not settings.use_ema:
        return None
    return WeightsEMA(trained_parameters(modules, groups), settings.ema_decay, settings.ema_update_every, device)


def ema_problems(settings: Any) -> list[str]:
    """Combinations the EMA cannot be used in, as sentences."""
    if settings.use_ema and settings.optimizer == "adamw_schedule_free":
        return [
            "use_ema cannot be used with optimizer adamw_schedule_free: it averages the weights itself (its samples "
            "and checkpoints hold its averaged weights); turn use_ema off or choose another optimizer"
        ]
    return []


@contextlib.contextmanager
def ema_weights(ema: WeightsEMA | None) -> Iterator[None]:
    """The EMA swapped in for a save or samples; nothing without an EMA."""
    if ema is None:
        yield
        return
    with ema.swapped_in():
        yield
