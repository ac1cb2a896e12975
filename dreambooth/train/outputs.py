"""A run's shared state (:class:`RunState`), its result (:class:`TrainResult`), and the trainer's saving and failure
handling (:class:`Outputs`, mixed into :class:`~dreambooth.train.loop.Trainer`).

Saving: the checkpoint (+ sidecar yaml), the resumable state, ``save_total_limit``; a write that fails for lack of
space becomes :class:`~dreambooth.train.failures.DiskFull`, naming the folder, the space needed and free, and the last
good checkpoint.  Failures: any exception after set-up keeps a resumable state of the last complete step when its
weights are sound, and ends as :class:`~dreambooth.train.failures.TrainingFailed` with one message.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DreamBoothError
from ..events import guarded
from .ema import TRAINED_SUFFIX, ema_weights
from .failures import (
    DiskFull,
    TrainingFailed,
    disk_full_message,
    is_disk_full,
    is_out_of_memory,
    out_of_memory_message,
    resume_hint,
    tensor_bytes,
)
from .optimizers import use_averaged_weights
from .state import STATE_NAME

BEST_TAG = "best"  # save_best's file: NAME_best.safetensors


@dataclass
class TrainResult:
    step: int
    total_steps: int
    cancelled: bool
    checkpoints: list[Path] = field(default_factory=list)
    samples: list[Path] = field(default_factory=list)
    state_dir: Path | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    seconds_per_step: float | None = None
    step_seconds: list[float] = field(default_factory=list)
    peak_memory_gib: float | None = None


@dataclass
class RunState:
    """What the stages of a run share once set up: where it stands, what it trains and with what."""

    device: Any
    plan: Any  # SamplePlan / BucketPlan
    global_batch: int  # samples per micro-batch over all processes
    total: int  # steps of the run
    modules: dict[str, Any]  # the trained modules by name ("unet", "text_encoder")
    groups: list[dict[str, Any]]  # the optimizer's parameter groups
    optimizer: Any
    lr_scheduler: Any
    scaler: Any  # GradScaler with fp16, else None
    autocast: Any
    text_stop_step: int  # the text encoder trains before this step
    result: TrainResult
    writer: Any = None  # tensorboard / wandb logger of the main process
    start: int = 0  # the step the run started from (resumed: the state's)
    step: int = 0  # steps completed
    last_saved: int | None = None  # step of the last checkpoint
    state_step: int | None = None  # step of the newest resumable state (saved or resumed from)
    updating: bool = False  # the optimizer is changing the weights: an exception now leaves them half-updated
    text_training: bool = True  # the text encoder (or its adapters) still trains: stop_text_encoder not reached
    step_times: list[float] = field(default_factory=list)  # seconds of each step


class Outputs:
    """Saving and failure handling of :class:`~dreambooth.train.loop.Trainer` (which provides settings,
    components, dist, callbacks, method, _emit, log, _samples, _tests)."""

    # ------------------------------------------------------------------------------------------------ saving

    def _save(self, run: RunState) -> None:
        """The checkpoint (+ sidecar yaml) or the LoRA file, the resumable state, retention, test images.  A full
        disk: DiskFull."""
        s, step = self.settings, run.step
        self._emit("saving", f"saving step {step}", step=step, total_steps=run.total)
        with ema_weights(self.ema):  # use_ema: the file holds the EMA (train/ema.py)
            paths = [self._save_network(run)] if self.method is not None else self._save_checkpoint(run)
        if self.ema is not None and s.ema_output == "both":  # NAME_STEP_trained: the weights as trained
            if self.method is not None:
                paths.append(self._save_network(run, suffix=TRAINED_SUFFIX))
            else:
                paths += self._save_checkpoint(run, suffix=TRAINED_SUFFIX)
        run.result.checkpoints.append(paths[0])
        if s.save_training_state:
            self._save_state(run, paths[0])
        self._prune_checkpoints(run)
        guarded(self.callbacks, "on_checkpoint", step, paths)
        self.log(f"saved {paths[0]}")
        with ema_weights(self.ema):
            self._tests(step, run.result, next(self.components.unet.parameters()).device)

    def _save_checkpoint(
        self, run: RunState, tag: str = "", extra: dict[str, str] | None = None, suffix: str = ""
    ) -> list[Path]:
        """The full checkpoint NAME_STEP (``tag``: NAME_TAG instead) + sidecar yaml, with ``extra`` metadata;
        returns the written paths, the checkpoint first.  ``suffix``: after NAME_STEP in the file name."""
        from ..models.components import save_single_file

        s, step = self.settings, run.step
        metadata = {
            "dreambooth.step": str(step),
            "dreambooth.base_model": Path(s.pretrained_model_name_or_path).name,
            "dreambooth.settings": self.requested.to_json(),
            **(extra or {}),
        }
        destination = self._checkpoint_folder() / f"{s.model_name}_{tag or step}{suffix}.{s.save_format}"
        checkpoint_bytes = tensor_bytes(self._component_tensors(), half=s.save_half)
        with self._disk_full_message(f"the checkpoint of step {step}", destination.parent, checkpoint_bytes):
            return save_single_file(self._saved_components(), destination, half=s.save_half, metadata=metadata)

    def _save_network(
        self, run: RunState, tag: str = "", extra: dict[str, str] | None = None, suffix: str = ""
    ) -> Path:
        """The adapter as one kohya-format LoRA file NAME_STEP (``tag``: NAME_TAG) in the Lora folder
        (train/method.py), with ``extra`` metadata; ``suffix``: after NAME_STEP in the file name."""
        from ..network.files import write_network_file

        destination = self.method.file_path(run.step)
        if tag:
            destination = destination.with_name(f"{self.settings.model_name}_{tag}{destination.suffix}")
        destination = destination.with_name(destination.stem + suffix + destination.suffix)
        tensors = self.method.tensors()
        with self._disk_full_message(
            f"the LoRA file of step {run.step}", destination.parent, tensor_bytes(tensors.values())
        ):
            destination.parent.mkdir(parents=True, exist_ok=True)
            return write_network_file(destination, tensors, {**self.method.metadata(run), **(extra or {})})

    def _save_best(self, run: RunState, validation_loss: float) -> None:
        """``save_best``: the weights of this step as NAME_best (checkpoint, or LoRA file in the Lora folder), written
        atomically over the previous best; not a NAME_STEP file, so save_total_limit never counts or removes it.
        Only the main process writes; the others wait."""
        use_averaged_weights(run.optimizer)  # schedule-free: the averaged weights, as every save
        if self.dist.is_main:
            self._emit("saving", f"saving the best weights (step {run.step})", step=run.step, total_steps=run.total)
            extra = {"dreambooth.validation_loss": repr(validation_loss), "dreambooth.step": str(run.step)}
            if self.method is not None:
                paths = [self._save_network(run, BEST_TAG, extra)]
            else:
                paths = self._save_checkpoint(run, BEST_TAG, extra)
            guarded(self.callbacks, "on_checkpoint", run.step, paths)
            self.log(f"saved {paths[0]} (validation loss {validation_loss:.6f} at step {run.step}, the lowest so far)")
        self.dist.barrier()

    def _best_file(self) -> Path:
        """Where :meth:`_save_best` writes."""
        s = self.settings
        suffix = "safetensors" if self.method is not None else s.save_format
        return self._checkpoint_folder() / f"{s.model_name}_{BEST_TAG}.{suffix}"

    def _save_state(self, run: RunState, checkpoint: Path | None) -> None:
        from .state import save_state

        out = Path(self.settings.output_dir)
        needed = tensor_bytes(p for m in run.modules.values() for p in m.state_dict().values())
        needed += tensor_bytes(
            v for state in run.optimizer.state.values() for v in state.values() if hasattr(v, "element_size")
        )
        with self._disk_full_message(f"the training state of step {run.step}", out, needed):
            run.result.state_dir = save_state(
                out / STATE_NAME,
                run.step,
                run.modules,
                run.optimizer,
                run.lr_scheduler,
                {
                    "model_name": self.settings.model_name,
                    "optimizer": self.settings.optimizer,  # its states are only readable by the same optimizer
                    "training_method": self.settings.training_method,
                    "total_steps": run.total,
                    "checkpoint": str(checkpoint) if checkpoint else "",
                },
                run.scaler,
                self.ema,
            )
        run.state_step = run.step

    def _checkpoint_folder(self) -> Path:
        """Where the outputs go: the checkpoint folder, or the Lora folder for an adapter (empty: output_dir;
        relative: inside it)."""
        s = self.settings
        return Path(s.output_dir) / (s.lora_dir if s.trains_network else s.checkpoint_dir)

    def _saved_components(self) -> Any:
        """The components as checkpoints hold them: the frozen modules' exact fp32 weights, not their copies in the
        run's half precision (train/precision.py)."""
        frozen = getattr(self, "frozen", None)
        return self.components if frozen is None else frozen.exact(self.components)

    def _component_tensors(self) -> list[Any]:
        c = self._saved_components()
        return [t for module in c.modules for t in module.state_dict().values()]  # SDXL: both text encoders

    @contextlib.contextmanager
    def _disk_full_message(self, what: str, folder: Path, needed: int) -> Any:
        """Turn a failed write for lack of space (OSError ENOSPC, SafetensorError, torch's writer) into DiskFull."""
        from .retention import run_checkpoints

        try:
            yield
        except Exception as error:
            if not is_disk_full(error):
                raise
            saved = run_checkpoints(self._checkpoint_folder(), self.settings.model_name)
            last = saved[-1][1] if saved else None
            raise DiskFull(disk_full_message(what, folder, needed, last)) from error

    def _prune_checkpoints(self, run: RunState) -> None:
        """``save_total_limit``: the newest N checkpoints stay, and the newest state's checkpoint."""
        from .retention import prune_checkpoints
        from .state import find_state, read_state_info

        s = self.settings
        if s.save_total_limit <= 0:
            return
        protected = set()
        state = find_state(Path(s.output_dir) / STATE_NAME)
        if state is not None and read_state_info(state).get("checkpoint"):
            protected.add(Path(read_state_info(state)["checkpoint"]))
        for path in prune_checkpoints(self._checkpoint_folder(), s.model_name, s.save_total_limit, protected):
            self.log(f"removed {path} (save_total_limit {s.save_total_limit})")
            if path in run.result.checkpoints:
                run.result.checkpoints.remove(path)

    def _save_and_sample(self, run: RunState, samples: bool = True) -> None:
        """Only the main process writes (checkpoint, state, samples); the others wait for it.  A schedule-free
        optimizer's averaged weights are the ones saved and sampled (the next step switches back)."""
        use_averaged_weights(run.optimizer)
        if self.dist.is_main:
            self._save(run)
            if samples:
                with ema_weights(self.ema):  # use_ema: samples of the EMA
                    self._samples(run.step, run.result, run.device)
        self.dist.barrier()
        run.last_saved = run.step

    # ------------------------------------------------------------------------------------------------ failures

    def _failure(self, run: RunState | None, error: Exception) -> Exception:
        """The exception that ends a failed run: its cause in a sentence, and what was kept to resume from."""
        out_of_memory = is_out_of_memory(error)
        if out_of_memory:
            headline = self._out_of_memory_message(run)
        elif isinstance(error, DreamBoothError):
            headline = str(error)
        else:
            headline = f"{type(error).__name__}: {error}"
        if run is None:  # before the first step nothing can be lost
            if isinstance(error, DreamBoothError) and not out_of_memory:
                return error
            return TrainingFailed(f"Training could not start: {headline}")
        kept, state_dir = self._keep_after_failure(run, error)
        message = f"Training stopped in step {run.step + 1} of {run.total}. {headline} {kept}"
        if state_dir is not None:
            message += " " + resume_hint(state_dir)
        return TrainingFailed(message, state_dir)

    def _keep_after_failure(self, run: RunState, error: Exception) -> tuple[str, Path | None]:
        """Save a state of the last complete step when its weights are sound; returns (sentence, state folder)."""
        import torch

        from .state import find_state, state_step

        existing = find_state(Path(self.settings.output_dir) / STATE_NAME)
        if existing is None and run.state_step is not None:
            existing = find_state(self.settings.resume_from)

        def keep(reason: str) -> tuple[str, Path | None]:
            if existing is None:
                return f"{reason}; there is no resumable state of this run.", None
            return f"{reason}; the last resumable state is {existing} (step {state_step(existing)}).", existing

        if not self.dist.is_main:
            return keep("Only the main process saves")
        if run.state_step == run.step:
            return keep(f"The state of step {run.step} was already saved")
        if run.step == run.start:
            return keep("Nothing was trained yet, so nothing was saved")
        if isinstance(error, DiskFull) or is_disk_full(error):
            return keep("Nothing more was saved")
        if run.updating:
            return keep(f"The optimizer was changing the weights when it failed, so step {run.step + 1} is not saved")
        finite = all(bool(torch.isfinite(p).all()) for m in run.modules.values() for p in m.parameters())
        if not finite:
            return keep(f"The weights are not finite (NaN or inf) after step {run.step}, so they were not saved")
        run.optimizer.zero_grad(set_to_none=True)  # the failed step's gradients: memory the save may need
        if run.device.type == "cuda":
            torch.cuda.empty_cache()
        try:
            self._save_state(run, None)
        except Exception as save_error:  # e.g. the disk is full too: say so, keep the first error
            return keep(f"Saving a state of step {run.step} failed too ({save_error})")
        self.log(f"saved a resumable state of step {run.step} in {run.result.state_dir}")
        return f"A resumable state of step {run.step} is saved in {run.result.state_dir}.", run.result.state_dir

    def _out_of_memory_message(self, run: RunState | None) -> str:
        import torch

        device = self.dist.device
        peak = total = None
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device)
            total = torch.cuda.get_device_properties(device).total_memory
        model = tensor_bytes(self._component_tensors()) if hasattr(self.components, "unet") else 0
        return out_of_memory_message(self.settings, peak, total, model)
