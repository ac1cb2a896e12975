"""Checkpoint retention (``save_total_limit``): keep the newest N checkpoints of a run, never the resume point's."""

from __future__ import annotations

import re
from pathlib import Path

from ..models.files import sidecar_yaml_path
from .ema import TRAINED_SUFFIX

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def run_checkpoints(folder: Path, model_name: str) -> list[tuple[int, Path]]:
    """``NAME_STEP.safetensors`` / ``.ckpt`` of ``model_name`` in ``folder``, as (step, path), oldest first."""
    pattern = re.compile(re.escape(model_name) + r"_(\d+)")
    found = []
    if Path(folder).is_dir():
        for path in Path(folder).iterdir():
            match = pattern.fullmatch(path.stem)
            if match and path.suffix.lower() in CHECKPOINT_SUFFIXES and path.is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(folder: Path, model_name: str, keep: int, protected: set[Path] = frozenset()) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (0: keep all) and their sidecar yaml; ``protected`` paths
    (the newest state's checkpoint) stay whatever their age.  Returns the deleted checkpoints."""
    if keep <= 0:
        return []
    protected = {Path(p).resolve() for p in protected}
    checkpoints = run_checkpoints(folder, model_name)
    deleted = []
    for _, path in checkpoints[: max(0, len(checkpoints) - keep)]:
        if path.resolve() in protected:
            continue
        trained = path.with_name(path.stem + TRAINED_SUFFIX + path.suffix)  # ema_output both: its companion
        for each in (path, trained):
            each.unlink(missing_ok=True)
            if not any(each.with_suffix(suffix).exists() for suffix in CHECKPOINT_SUFFIXES):
                sidecar_yaml_path(each).unlink(missing_ok=True)  # shared by NAME_STEP.safetensors and NAME_STEP.ckpt
        deleted.append(path)
    return deleted
