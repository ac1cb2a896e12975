"""The optimizers beyond AdamW, each from its own library, and what the settings must know about them before training.

Optional packages (not in requirements.txt): a missing one refuses the settings with one sentence naming it and how
to install it (:func:`optimizer_problems`); the tab's environment note lists them (host.py).

- adafactor: ``transformers.optimization.Adafactor`` with the run's learning rate: ``relative_step=False``,
  ``scale_parameter=False``, ``warmup_init=False`` (its own step-size rule off, so the schedule drives it), no first
  moment (``beta1=None``), ``weight_decay`` = adam_weight_decay; the rest its defaults.
- prodigy: ``prodigyopt.Prodigy`` (learning rate 1.0 recommended: the rate multiplies the step size it estimates),
  with the Adam betas, epsilon, weight decay and the prodigy_* fields.
- lion: ``lion_pytorch.Lion`` (betas adam_beta1 / adam_beta2, weight decay); lion_8bit: bitsandbytes' ``Lion8bit``
  (probed on the device first, as 8-bit AdamW is).
- adamw_schedule_free: ``schedulefree.AdamWScheduleFree`` (Adam betas, epsilon, weight decay).  Its weights in train
  mode are not the ones to use: :func:`use_averaged_weights` switches it to eval mode (the averaged weights) around
  samples and saves and for the final output, :func:`use_training_weights` back for the steps.

Prodigy and schedule-free AdamW keep running values in their parameter groups (Prodigy's step-size estimate over all
parameters, schedule-free's weight sums), which per-parameter optimizers would split: with fused_backward or
full_bf16 (train/paramwise.py) they are refused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
from typing import Any

from ..errors import DreamBoothError

# optimizer -> (import name, pip name) of the optional package it needs
PACKAGES = {
    "prodigy": ("prodigyopt", "prodigyopt"),
    "lion": ("lion_pytorch", "lion-pytorch"),
    "adamw_schedule_free": ("schedulefree", "schedulefree"),
    "adamw_8bit": ("bitsandbytes", "bitsandbytes"),
    "lion_8bit": ("bitsandbytes", "bitsandbytes"),
}
GROUP_STATE = ("prodigy", "adamw_schedule_free")  # running values in the parameter groups: no per-parameter copies
PRODIGY_MIN_LR = 0.1


def package_missing(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):  # a broken parent package, or a module whose spec is None
        return True


def optimizer_problems(settings: Any) -> list[str]:
    """Sentences refusing the settings' optimizer before training: its package missing, or a combination it cannot
    work in."""
    problems = []
    name = settings.optimizer
    if name in PACKAGES:
        module, pip_name = PACKAGES[name]
        if package_missing(module):
            problems.append(
                f"optimizer {name} needs the {pip_name} package, which is not installed: install it with "
                f"'pip install {pip_name}' (in the WebUI's Python environment for the tab), or choose optimizer adamw"
            )
    if name in GROUP_STATE:
        for flag in ("fused_backward", "full_bf16"):
            if getattr(settings, flag):
                problems.append(
                    f"optimizer {name} cannot be used with {flag}: {flag} steps one optimizer per parameter, and "
                    f"{name} keeps values over all parameters together; turn {flag} off or choose another optimizer"
                )
    if name == "adafactor" and settings.learning_rate <= 0:
        problems.append("optimizer adafactor here uses the learning rate you give: set learning_rate above 0")
    return problems


def optimizer_warnings(settings: Any) -> list[str]:
    if settings.optimizer == "prodigy" and settings.learning_rate < PRODIGY_MIN_LR:
        return [
            f"optimizer prodigy with learning_rate {settings.learning_rate:g}: Prodigy estimates its own step size "
            "and the learning rate multiplies it; 1.0 is recommended (use prodigy_d_coef to make it more careful)"
        ]
    return []


def _import(name: str) -> Any:
    module, pip_name = PACKAGES[name]
    try:
        return importlib.import_module(module)
    except Exception as error:  # ImportError, or a broken native library
        raise DreamBoothError(
            f"optimizer {name} needs the {pip_name} package, which cannot be imported ({error}): install it with "
            f"'pip install {pip_name}', or choose optimizer adamw"
        ) from error


def builder(settings: Any) -> Any:
    """``build(groups)`` -> the optimizer over ``groups`` for the optimizers of this module; None for AdamW's."""
    betas = (settings.adam_beta1, settings.adam_beta2)
    decay = settings.adam_weight_decay
    name = settings.optimizer
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return lambda groups: Adafactor(
            groups,
            lr=settings.learning_rate,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            weight_decay=decay,
        )
    if name == "prodigy":
        prodigy = _import(name).Prodigy

        def build(groups: list[dict[str, Any]]) -> Any:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
                return prodigy(
                    groups,
                    betas=betas,
                    eps=settings.adam_epsilon,
                    weight_decay=decay,
                    d_coef=settings.prodigy_d_coef,
                    use_bias_correction=settings.prodigy_use_bias_correction,
                    safeguard_warmup=settings.prodigy_safeguard_warmup,
                )

        return build
    if name == "lion":
        lion = _import(name).Lion
        return lambda groups: lion(groups, betas=betas, weight_decay=decay)
    if name == "adamw_schedule_free":
        schedule_free = _import(name).AdamWScheduleFree
        return lambda groups: schedule_free(groups, betas=betas, eps=settings.adam_epsilon, weight_decay=decay)
    return None


def is_schedule_free(optimizer: Any) -> bool:
    """A schedule-free optimizer (its train / eval modes): its groups carry ``train_mode``."""
    return bool(optimizer.param_groups) and "train_mode" in optimizer.param_groups[0] and hasattr(optimizer, "eval")


def use_averaged_weights(optimizer: Any) -> None:
    """Schedule-free: the weights become the averaged ones (eval mode) for samples, saves and the output."""
    if is_schedule_free(optimizer):
        optimizer.eval()


def use_training_weights(optimizer: Any) -> None:
    """Schedule-free: the weights the gradients are taken at (train mode), before a step."""
    if is_schedule_free(optimizer):
        optimizer.train()
