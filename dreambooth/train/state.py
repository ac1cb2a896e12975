"""The resumable training state: trained weights (fp32), optimizer, LR schedule, step and RNG.

A state is written into a temporary folder beside ``output_dir/state`` (``.state.XXXX``); ``state.json`` is written
last and atomically, so it marks the folder complete.  Then ``state`` becomes ``state.old``, the new folder takes the
name ``state``, and the old one is removed.  A kill at any moment leaves at least one complete state: the old
``state``, ``state.old`` or the finished temporary folder (killed between the two renames).  :func:`find_state`
finds the newest complete one, so resuming from ``.../state`` (or from the run folder) works in every case.
(Switching a symlink would close the window, but symlinks need privileges on Windows, where most WebUI users are.)

Everything is read back with the safe loader (weights only).  The ``.pt`` files are written in torch's legacy
format: the WebUI's safe unpickler (which replaces ``torch.load`` inside the WebUI) refuses the entries of the current
zip format and makes ``torch.load`` return None; it accepts the legacy one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import DreamBoothError
from .ema import EMA_FILE

STATE_VERSION = 1
STATE_NAME = "state"
REQUIRED_FILES = ("optimizer.pt", "scheduler.pt", "rng.pt")


def save_state(
    folder: Path,
    step: int,
    modules: dict[str, Any],
    optimizer: Any,
    lr_scheduler: Any,
    info: dict[str, Any],
    scaler: Any = None,
    ema: Any = None,
) -> Path:
    """Write the state of ``step`` and make it ``folder``; the previous one stays complete until the new one is.
    ``ema``: the run's :class:`~dreambooth.train.ema.WeightsEMA` (``ema.safetensors``, its update count in
    ``state.json``)."""
    import torch
    from safetensors.torch import save_file

    from ..compat import text_encoder_state_dict

    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, module in modules.items():
            state = text_encoder_state_dict(module) if name == "text_encoder" else module.state_dict()
            save_file(
                {k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(temp / f"{name}.safetensors")
            )
        legacy = {"_use_new_zipfile_serialization": False}
        torch.save(optimizer.state_dict(), temp / "optimizer.pt", **legacy)
        torch.save(lr_scheduler.state_dict(), temp / "scheduler.pt", **legacy)
        rng = {"cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, temp / "rng.pt", **legacy)
        if scaler is not None:
            torch.save(scaler.state_dict(), temp / "scaler.pt", **legacy)
        if ema is not None:
            tensors, info["ema"] = ema.state()
            save_file(tensors, str(temp / EMA_FILE))
        _fsync_files(temp)
        marker = temp / "state.json.tmp"  # the completion marker, written last and renamed into place
        marker.write_text(
            json.dumps({"version": STATE_VERSION, "step": step, "modules": sorted(modules), **info}, indent=2)
        )
        _fsync_files(temp)
        marker.replace(temp / "state.json")
        _swap_in(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    _remove_leftovers(folder)
    return folder


def _fsync_files(folder: Path) -> None:
    """Flush the folder's files to disk, so a power cut after the rename cannot leave a complete-looking state."""
    for path in folder.iterdir():
        with path.open("rb+") as handle:
            os.fsync(handle.fileno())


def _swap_in(temp: Path, folder: Path) -> None:
    """``folder`` -> ``folder.old``, ``temp`` -> ``folder``.  Between the two renames no ``folder`` exists: the
    complete ``temp`` and ``folder.old`` are found by :func:`find_state`."""
    old = folder.with_name(folder.name + ".old")
    if folder.exists():
        shutil.rmtree(old, ignore_errors=True)
        folder.rename(old)
    try:
        temp.rename(folder)
    except BaseException:
        if old.exists() and not folder.exists():
            old.rename(folder)  # an exception (not a kill): put the previous state back under its name
        raise


def _remove_leftovers(folder: Path) -> None:
    """Remove ``folder.old`` and temporary folders of earlier saves that were killed: ``folder`` is newer."""
    shutil.rmtree(folder.with_name(folder.name + ".old"), ignore_errors=True)
    for leftover in folder.parent.glob(f".{folder.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


def state_step(folder: Path) -> int | None:
    """The step of a complete state folder (its ``state.json`` and every file it needs present), else None."""
    folder = Path(folder)
    try:
        info = json.loads((folder / "state.json").read_text())
        step = int(info["step"])
        names = [f"{name}.safetensors" for name in info["modules"]] + list(REQUIRED_FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if info.get("version") != STATE_VERSION or not all((folder / name).is_file() for name in names):
        return None
    return step


def find_state(path: str | os.PathLike) -> Path | None:
    """The newest complete training state for ``path``, or None.

    ``path`` is a state folder (``.../state``, which may be missing after a kill between the renames of a save), or a
    run folder holding ``state``.  Candidates: the folder itself, ``NAME.old`` and complete temporary ``.NAME.*``
    folders beside it; the highest step wins, ``NAME`` itself on a tie.
    """
    path = Path(path)
    if path.name != STATE_NAME and state_step(path) is None and _candidates(path / STATE_NAME):
        path = path / STATE_NAME  # a run folder
    best: tuple[int, Path] | None = None
    for candidate in _candidates(path):  # ``NAME`` first, so it wins a tie
        step = state_step(candidate)
        if step is not None and (best is None or step > best[0]):
            best = (step, candidate)
    return best[1] if best else None


def _candidates(path: Path) -> list[Path]:
    if not path.parent.is_dir():
        return []
    names = [path, path.with_name(path.name + ".old")]
    names += sorted(p for p in path.parent.glob(f".{path.name}.*") if p.is_dir())
    return [p for p in names if p.is_dir()]


def read_state_info(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "state.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DreamBoothError(f"{folder}: not a readable training state ({error}).") from error
    if info.get("version") != STATE_VERSION:
        raise DreamBoothError(f"{folder}: training state version {info.get('version')} is not supported.")
    return info


def load_state(
    folder: Path,
    modules: dict[str, Any],
    optimizer: Any,
    lr_scheduler: Any,
    scaler: Any = None,
    optimizer_name: str | None = None,
    ema: Any = None,
) -> int:
    """Restore everything saved by :func:`save_state`; returns the step to continue from.

    ``optimizer_name``: the settings' optimizer; a state whose optimizer states were made by another one is refused
    (8-bit and 32-bit AdamW states cannot stand in for each other).  ``ema``: the run's EMA, given the saved
    averages; a state without them (saved with use_ema off) leaves it at the resumed weights, with no update made."""
    import torch
    from safetensors.torch import load_file

    from ..compat import load_text_encoder_state_dict
    from ..models.safe_pickle import load_pickle

    folder = find_state(folder) or Path(folder)
    info = read_state_info(folder)
    missing = set(info["modules"]) ^ set(modules)
    if missing:
        raise DreamBoothError(
            f"{folder}: the state trained {sorted(info['modules'])} but these settings train {sorted(modules)}; "
            "resume with the same train_text_encoder setting."
        )
    saved_optimizer = info.get("optimizer")
    if optimizer_name and saved_optimizer and saved_optimizer != optimizer_name:
        raise DreamBoothError(
            f"{folder}: the state was trained with optimizer {saved_optimizer} but these settings use "
            f"{optimizer_name}; resume with optimizer {saved_optimizer}."
        )
    for name, module in modules.items():
        tensors = load_file(str(folder / f"{name}.safetensors"))
        parameter = next(module.parameters())
        tensors = {k: v.to(parameter.device) for k, v in tensors.items()}
        if name == "text_encoder":
            load_text_encoder_state_dict(module, tensors)
        else:
            module.load_state_dict(tensors, strict=True)
    optimizer.load_state_dict(load_pickle(folder / "optimizer.pt", "training state file"))
    lr_scheduler.load_state_dict(load_pickle(folder / "scheduler.pt", "training state file"))
    rng = load_pickle(folder / "rng.pt", "training state file")
    torch.random.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(load_pickle(folder / "scaler.pt", "training state file"))
    if ema is not None:
        if (folder / EMA_FILE).is_file() and "ema" in info:
            ema.load(load_file(str(folder / EMA_FILE)), info["ema"], str(folder / EMA_FILE))
        else:
            ema.restart()
    return int(info["step"])
