"""What a run says when it fails: out of GPU memory, a full disk, any other exception.

Pure functions of the error, the settings and a few measured numbers, so every message is testable on the CPU.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import DreamBoothError

DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# How the libraries report a failed write when the OSError is not passed through: safetensors' SafetensorError and
# torch's stream writer ("write(): fd 3 failed" / "file write failed") drop the errno but keep its text.
DISK_FULL_TEXTS = ("no space left on device", "disk quota exceeded", "write(): fd", "file write failed")


class TrainingFailed(DreamBoothError):
    """A run ended by an exception.  ``state_dir``: the newest resumable state (None: none was kept)."""

    def __init__(self, message: str, state_dir: Path | None = None):
        super().__init__(message)
        self.state_dir = state_dir


class DiskFull(DreamBoothError):
    """A save found no room; the message names the folder, the space needed and free, the last good checkpoint."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA out-of-memory (``torch.cuda.OutOfMemoryError``, or a RuntimeError saying so)."""
    import torch

    out_of_memory = getattr(torch.cuda, "OutOfMemoryError", ())
    if out_of_memory and isinstance(error, out_of_memory):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def is_disk_full(error: BaseException) -> bool:
    """A write failed for lack of space, anywhere in the chain of causes."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(current).lower() for text in DISK_FULL_TEXTS):
            return True
        current = current.__cause__ or current.__context__
    return False


def tensor_bytes(tensors: Iterable[Any], half: bool = False) -> int:
    """Bytes of ``tensors`` as saved: floating tensors in fp16 when ``half``, else fp32 (also bf16 weights)."""
    total = 0
    for tensor in tensors:
        size = (2 if half else 4) if tensor.is_floating_point() else tensor.element_size()
        total += tensor.numel() * size
    return total


def gib(value: float) -> str:
    """A size in bytes as GiB (MiB below 0.1 GiB, where two decimals of GiB would say 0.00)."""
    return f"{value / 2**30:.2f} GiB" if value >= 0.1 * 2**30 else f"{value / 2**20:.1f} MiB"


def free_bytes(folder: Path) -> int | None:
    """Free space of the disk that holds ``folder`` (its nearest existing parent), or None when unknown."""
    folder = Path(folder)
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def disk_full_message(what: str, folder: Path, needed: int, last_checkpoint: Path | None) -> str:
    """``what``: 'the checkpoint of step 40' / 'the training state of step 40'."""
    free = free_bytes(folder)
    free_text = "unknown free space" if free is None else f"{gib(free)} free"
    last = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved before"
    return (
        f"The disk is full: {what} needs about {gib(needed)} in {folder} ({free_text}); nothing was overwritten and "
        f"{last}. Free some space (or choose another output folder) and resume."
    )


MEMORY_SETTINGS = (
    # (setting, is it already lowering memory?, advice)
    ("low_memory", lambda s: s.low_memory, "low_memory on"),
    ("gradient_checkpointing", lambda s: s.gradient_checkpointing, "gradient_checkpointing on"),
    ("train_batch_size", lambda s: s.train_batch_size <= 1, "a smaller train_batch_size"),
    ("resolution", lambda s: s.resolution <= 512, "a lower resolution"),
    ("mixed_precision", lambda s: s.mixed_precision != "no", "mixed_precision fp16 or bf16"),
    ("optimizer", lambda s: s.optimizer == "adamw_8bit", "optimizer adamw_8bit (use_8bit_adam; needs bitsandbytes)"),
    ("train_text_encoder", lambda s: not s.train_text_encoder, "train_text_encoder off"),
    # not offered where validation refuses it (fp16 gradient scaling)
    ("fused_backward", lambda s: s.fused_backward or s.mixed_precision == "fp16", "fused_backward on"),
    ("full_bf16", lambda s: s.full_bf16 or s.mixed_precision == "fp16", "full_bf16 on (with mixed_precision bf16)"),
)


def out_of_memory_message(settings: Any, peak_bytes: int | None, total_bytes: int | None, model_bytes: int) -> str:
    """What used the GPU's memory and which of the run's settings would lower it."""
    used = f"peak {gib(peak_bytes)} allocated" if peak_bytes is not None else "the peak is unknown"
    if total_bytes:
        used += f" of the GPU's {gib(total_bytes)}"
    advice = [text for _, is_low, text in MEMORY_SETTINGS if not is_low(settings)]
    lower = (
        "Settings that lower it: " + ", ".join(advice) + "."
        if advice
        else "Every memory setting is already at its lowest: this GPU is too small for this model."
    )
    return f"Out of GPU memory: {used}; the model's weights take {gib(model_bytes)}. {lower}"


def resume_hint(state_dir: Path) -> str:
    return (
        f"Resume with resume_from={state_dir} (CLI: --set resume_from={state_dir}; the tab: pick it under "
        "'Resume from')."
    )
