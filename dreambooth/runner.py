"""One training job at a time on a background thread, and a frozen snapshot of it for whoever polls.

The UI (a Gradio tab, the REST routes) never touches the trainer: it starts a job here, reads
:meth:`Runner.snapshot` (a browser reload simply reads it again, so the page re-attaches to the running job), and
sends commands (cancel, save now, sample now).  Where the job runs is the :class:`~dreambooth.host.Host`'s business:
inside the WebUI its ``session`` holds the queue lock, frees the loaded model's GPU memory and restores it after.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DreamBoothError
from .events import Callbacks, Commands, Progress
from .host import CHECKPOINT_SUFFIXES, Host
from .settings import Settings, SettingsError

log = logging.getLogger("dreambooth")

MAX_LOG_LINES = 400


class RunnerBusy(DreamBoothError):
    """A job is already running: one GPU, one job."""


@dataclass(frozen=True)
class JobSnapshot:
    """Everything a UI shows about the current (or last) job.  Immutable: safe to hand to any thread."""

    job_id: int = 0
    state: str = "idle"  # idle, running, finished, cancelled, failed
    model_name: str = ""
    progress: Progress = Progress(phase="idle")
    losses: tuple[tuple[int, float], ...] = ()
    validation_losses: tuple[tuple[int, float], ...] = ()  # (step, validation loss), when images are held out
    samples: tuple[str, ...] = ()
    checkpoints: tuple[str, ...] = ()
    log: tuple[str, ...] = ()
    error: str = ""
    started_at: float | None = None
    finished_at: float | None = None

    @property
    def is_running(self) -> bool:
        return self.state == "running"

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["is_running"] = self.is_running
        return data


CARRIED = ("loss", "instance_loss", "prior_loss", "validation_loss", "seconds_per_step", "peak_memory_gib")


def _carry_forward(last: Progress, new: Progress) -> Progress:
    """Keep the last known training figures (loss, s/step, memory, and step / total when the event has none)
    through saving / sampling / done events."""
    kept = {name: getattr(last, name) for name in CARRIED if getattr(new, name) is None}
    if not new.total_steps and last.total_steps:
        kept.update(step=last.step, total_steps=last.total_steps)
    if not new.learning_rates and last.learning_rates:
        kept["learning_rates"] = last.learning_rates
    return dataclasses.replace(new, **kept) if kept else new


class _JobCallbacks(Callbacks):
    """Trainer events -> the runner's snapshot (and the host, e.g. the WebUI's ``shared.state``)."""

    def __init__(self, runner: Runner, job_id: int, settings: Settings | None = None):
        self.runner, self.job_id, self.settings = runner, job_id, settings

    def on_progress(self, progress: Progress) -> None:
        runner = self.runner
        if runner.host.interrupted():
            runner.commands.cancel()
        progress = _carry_forward(runner.snapshot().progress, progress)
        extra: dict[str, Any] = {"progress": progress}
        if progress.phase == "training" and progress.loss is not None:
            extra["losses"] = (*runner.snapshot().losses, (progress.step, progress.loss))
        if progress.phase == "validation" and progress.validation_loss is not None:
            extra["validation_losses"] = (
                *runner.snapshot().validation_losses,
                (progress.step, progress.validation_loss),
            )
        runner._update(self.job_id, **extra)
        runner.host.report_progress(progress)

    def on_samples(self, step: int, paths: list[Path]) -> None:
        self.runner._update(self.job_id, samples=(*self.runner.snapshot().samples, *map(str, paths)))
        self.runner.host.samples_written(paths)

    def on_checkpoint(self, step: int, paths: list[Path]) -> None:
        files = [str(p) for p in paths if p.suffix.lower() in CHECKPOINT_SUFFIXES]  # not the sidecar yaml
        kept = [p for p in self.runner.snapshot().checkpoints if Path(p).is_file() and p not in files]  # NAME_best
        self.runner._update(self.job_id, checkpoints=(*kept, *files))
        self.runner.host.checkpoint_written(paths, self.settings)

    def on_log(self, message: str) -> None:
        self.runner._append_log(self.job_id, message)


class Runner:
    """Owns the one training thread.  ``start`` refuses a second job while one runs."""

    def __init__(self, host: Any = None):
        self.host = host if host is not None else Host()
        self.commands = Commands()
        self._lock = threading.Lock()
        self._snapshot = JobSnapshot()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------- reading

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return self._snapshot

    def _update(self, job_id: int, **changes: Any) -> None:
        with self._lock:
            if self._snapshot.job_id == job_id:
                self._snapshot = dataclasses.replace(self._snapshot, **changes)

    def _append_log(self, job_id: int, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        with self._lock:
            if self._snapshot.job_id == job_id:
                lines = (*self._snapshot.log, line)[-MAX_LOG_LINES:]
                self._snapshot = dataclasses.replace(self._snapshot, log=lines)

    # ------------------------------------------------------------------------------------------- control

    def start(self, settings: Settings) -> int:
        """Validate and start a job; returns its id.  Raises :class:`SettingsError` or :class:`RunnerBusy`."""
        problems = self.host.check_settings(settings)
        if problems:
            raise SettingsError(problems)
        with self._lock:
            if self._snapshot.is_running:
                raise RunnerBusy(
                    f"a training job ({self._snapshot.model_name}) is already running: cancel it or wait for it"
                )
            job_id = self._snapshot.job_id + 1
            self.commands = Commands()
            self._snapshot = JobSnapshot(
                job_id=job_id,
                state="running",
                model_name=settings.model_name,
                progress=Progress(phase="starting", message="starting"),
                started_at=time.time(),
            )
            self._thread = threading.Thread(
                target=self._run, args=(job_id, settings), name="dreambooth-trainer", daemon=True
            )
            self._thread.start()
        return job_id

    def _run(self, job_id: int, settings: Settings) -> None:
        from .train.loop import Trainer

        callbacks = _JobCallbacks(self, job_id, settings)
        state, error = "failed", ""
        try:
            with self.host.session(settings, callbacks.on_log) as components:
                trainer = Trainer(settings, callbacks=callbacks, commands=self.commands, components=components)
                del components  # the trainer holds the only reference: gone before the host restores its models
                try:
                    cancelled = trainer.run().cancelled
                finally:
                    del trainer
            state = "cancelled" if cancelled else "finished"
        except DreamBoothError as exc:
            error = str(exc)
            cause = exc.__cause__
            if cause is not None and not isinstance(cause, DreamBoothError):  # a bug or OOM: the console keeps it
                log.error("training failed: %s", error, exc_info=(type(cause), cause, cause.__traceback__))
        except Exception as exc:  # the thread must end with a readable state, whatever went wrong
            error = f"{type(exc).__name__}: {exc}"
            log.error("training failed:\n%s", traceback.format_exc())
        finally:
            if error:
                self._append_log(job_id, f"error: {error}")
            phase = {"finished": "done"}.get(state, state)
            with self._lock:
                last = self._snapshot.progress
                self._snapshot = dataclasses.replace(
                    self._snapshot,
                    state=state,
                    error=error,
                    finished_at=time.time(),
                    progress=dataclasses.replace(last, phase=phase, message=error or phase),
                )
            self.host.job_ended(state, error)

    def _command(self, what: str) -> bool:
        if not self.snapshot().is_running:
            return False
        self.commands.request(what)
        return True

    def cancel(self) -> bool:
        """Ask the running job to stop after its current step (it saves a resumable state). False: nothing runs."""
        return self._command("cancel")

    def save_now(self) -> bool:
        return self._command("save")

    def sample_now(self) -> bool:
        return self._command("sample")

    def wait(self, timeout: float) -> bool:
        """Wait for the current job's thread; True when it has ended."""
        thread = self._thread
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()
