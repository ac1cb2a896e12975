"""Test helpers of the fake WebUI; no counterpart in the real WebUI.

``calls`` is one log shared by every fake module, in the order things happened (``send_model_to_cpu``,
``devices.torch_gc``, ``opts.set``, ``queue_lock.acquire`` ...). ``reset()`` puts every fake module back to a fresh
start so tests do not leak state into each other.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modules.sd_models import FakeSdModel


@dataclass(frozen=True)
class Call:
    """One recorded call: ``name`` is ``module.function`` (e.g. ``sd_models.send_model_to_cpu``)."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)


calls: list[Call] = []


def record(name: str, **args: Any) -> None:
    calls.append(Call(name, args))


def call_names(prefix: str = "") -> list[str]:
    """Names of the recorded calls, optionally only those starting with ``prefix``."""
    return [c.name for c in calls if c.name.startswith(prefix)]


def reset(root: str | os.PathLike | None = None, **cmd_opts: Any) -> None:
    """Fresh state everywhere: paths (under ``root`` when given), cmd_opts (defaults updated with ``cmd_opts``),
    opts, state, devices, callbacks, checkpoints, loaded models, VAE globals, the interrogators
    (``shared.interrogator``, ``deepbooru.model``: unloaded, default outputs), call log, and the fake ``launch`` /
    ``networks`` modules when imported. Objects are reset in place, so references taken with
    ``from modules.shared import opts`` stay valid."""
    from modules import (
        call_queue,
        deepbooru,
        devices,
        errors,
        interrogate,
        paths,
        script_callbacks,
        sd_models,
        sd_vae,
        shared,
        shared_state,
    )

    if call_queue.queue_lock.locked():
        raise RuntimeError("fake reset: call_queue.queue_lock is still held by a previous test")
    if root is not None:
        paths.configure(root)
    shared.reset_cmd_opts(**cmd_opts)
    shared.opts.reset()
    shared_state.reset_state(shared.state)
    devices.reset()
    script_callbacks.clear()
    sd_models.reset()
    sd_vae.reset()
    interrogate.reset()  # after devices.reset(): running_on_cpu follows devices.device_interrogate
    deepbooru.reset()
    errors.reported.clear()
    for name in ("launch", "networks"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "reset"):
            module.reset()
    calls.clear()


def load_checkpoint(filename: str | os.PathLike) -> FakeSdModel:
    """Scan the checkpoint folders and load ``filename`` as the current model, as the WebUI does at start."""
    from modules import sd_models, shared

    sd_models.list_models()
    wanted = os.path.abspath(filename)  # noqa: PTH100
    info = next((i for i in sd_models.checkpoints_list.values() if os.path.abspath(i.filename) == wanted), None)  # noqa: PTH100
    if info is None:
        info = sd_models.CheckpointInfo(str(filename))
        info.register()
    shared.opts.data["sd_model_checkpoint"] = info.title
    return sd_models.load_model(info)
