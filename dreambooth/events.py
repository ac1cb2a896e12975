"""What flows between the trainer and whoever watches it: progress snapshots out, commands in.

* :class:`Progress` is a frozen snapshot; a UI polls the latest one, a CLI prints it.
* :class:`Callbacks` are no-ops by default; the trainer calls them through :func:`guarded`, so a failing UI
  callback is logged and never stops training.
* :class:`Commands` are flags set from any thread and read by the trainer between steps.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("dreambooth")


@dataclass(frozen=True)
class Progress:
    phase: str  # loading, class_images, caching, training, validation, saving, sampling, done, cancelled, error
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    loss: float | None = None
    instance_loss: float | None = None
    prior_loss: float | None = None
    validation_loss: float | None = None  # the latest validation loss (train/validation_loss.py), if any
    learning_rates: dict[str, float] = field(default_factory=dict)
    seconds_per_step: float | None = None
    eta_seconds: float | None = None
    peak_memory_gib: float | None = None
    message: str = ""


class Callbacks:
    """Override what you need; every method is optional."""

    def on_progress(self, progress: Progress) -> None: ...

    def on_samples(self, step: int, paths: list[Path]) -> None: ...

    def on_checkpoint(self, step: int, paths: list[Path]) -> None: ...

    def on_log(self, message: str) -> None: ...


def guarded(callbacks: Callbacks | None, name: str, *args: Any) -> None:
    """Call ``callbacks.name(*args)``; an exception is logged, never raised into the training loop."""
    if callbacks is None:
        return
    try:
        getattr(callbacks, name)(*args)
    except Exception:  # a UI problem must not kill a multi-hour run
        log.exception("callback %s failed (training goes on)", name)


class Commands:
    """Thread-safe requests to a running trainer: cancel, save now, sample now."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flags = {"cancel": False, "save": False, "sample": False}

    def request(self, what: str) -> None:
        if what not in self._flags:
            raise ValueError(f"unknown command {what!r}; known: {', '.join(self._flags)}")
        with self._lock:
            self._flags[what] = True

    def cancel(self) -> None:
        self.request("cancel")

    def save_now(self) -> None:
        self.request("save")

    def sample_now(self) -> None:
        self.request("sample")

    def take(self, what: str) -> bool:
        """Read and clear one flag (``cancel`` stays set once requested)."""
        with self._lock:
            value = self._flags[what]
            if what != "cancel":
                self._flags[what] = False
            return value

    @property
    def cancelled(self) -> bool:
        with self._lock:
            return self._flags["cancel"]
