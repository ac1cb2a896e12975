"""The one way this package reads a pickle (``.ckpt``, ``.bin``, ``.pt``): nothing in the file can run.

Every pickled file we read -- a single-file checkpoint, a ``pytorch_model.bin`` / ``diffusion_pytorch_model.bin``
of a diffusers folder, a separate VAE, the optimizer / scheduler / RNG files of a training state -- goes through
:func:`load_pickle`.  It is ``torch.load(weights_only=True)``: torch's restricted unpickler builds tensors and plain
containers only.  Original ``.ckpt`` files (the SD 1.x releases and many community files) hold a little more:
``global_step`` as a numpy scalar and pytorch-lightning's ``ModelCheckpoint`` class as a key of ``callbacks``.
The WebUI's own safe unpickler (``modules/safe.py``) allows exactly those, and so do we, through torch's own
allow-list (``torch.serialization.safe_globals``, entered for one load and left after it; nothing stays changed):

* ``numpy.core.multiarray.scalar`` / ``_reconstruct``, ``numpy.dtype``, ``numpy.ndarray`` (numpy 2 calls the
  module ``numpy._core``: both spellings name the same functions);
* ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`` (and its module): an inert stand-in class,
  since lightning is not installed and the class is only used as a dictionary key;
* ``torch.nn.modules.container.ParameterDict``;
* ``_codecs.encode``, ``builtins.set``, ``collections.OrderedDict`` and torch's tensor rebuilders, storages and
  dtypes are allowed by torch itself.

Anything else is refused with :class:`UnsafeCheckpointError`: one line naming the file and the global it asked for.
torch keeps its allow-list per process: while one of our loads runs, another thread's ``torch.load`` accepts these
few inert extras too, and nothing more; after it the list is as it was.
Naming globals this way needs torch 2.6 or newer (``safe_globals`` with ``(object, "qualified.name")`` pairs),
checked by trying once at run time; an older torch still loads files of plain tensors, and a refusal says which
torch would load the rest.
"""

from __future__ import annotations

import functools
import os
import re
import types
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, UnsafeCheckpointError

LIGHTNING_MODULE = "pytorch_lightning.callbacks.model_checkpoint"


class ModelCheckpointStandIn:
    """Stands in for pytorch-lightning's ``ModelCheckpoint`` while a checkpoint is read.

    Original SD checkpoints use the class object only as the key of their ``callbacks`` entry; building or
    filling an instance does nothing, so no code of the file's choosing can run through it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass


_LIGHTNING_STAND_IN_MODULE = types.ModuleType(LIGHTNING_MODULE, "Inert stand-in: pytorch-lightning is not installed.")
_LIGHTNING_STAND_IN_MODULE.ModelCheckpoint = ModelCheckpointStandIn  # type: ignore[attr-defined]


def _numpy_globals() -> list[tuple[Any, str]]:
    """numpy's part of the WebUI's allow-list, as ``(object, name in the pickle)`` pairs."""
    try:
        import numpy
    except ImportError:  # torch runs without numpy; then no file can hold numpy objects we could build
        return []
    try:
        from numpy._core import multiarray  # numpy 2 (and the forward-compatible alias in numpy 1.26)
    except ImportError:
        from numpy.core import multiarray  # numpy < 1.26
    pairs: list[tuple[Any, str]] = []
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        pairs += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    pairs += [(numpy.dtype, "numpy.dtype"), (numpy.ndarray, "numpy.ndarray")]
    # ``numpy.dtype(...)`` returns an instance of a subclass per kind (numpy.dtypes.Int64DType, ...), and torch
    # fills (BUILD) only instances of allow-listed classes.  These classes are registered under names that hold
    # a newline, which no GLOBAL opcode can spell: a file cannot name them, only obtain them through numpy.dtype.
    kinds = {type(numpy.dtype(code)) for code in numpy.typecodes["All"] if code != "O"}
    pairs += [(kind, f"numpy.dtype\n{kind.__module__}.{kind.__qualname__}") for kind in kinds]
    return pairs


def webui_allow_list() -> list[tuple[Any, str]]:
    """What the WebUI's ``modules/safe.py`` allows beyond torch's own list, as ``safe_globals`` entries."""
    import torch

    return [
        *_numpy_globals(),
        (torch.nn.ParameterDict, "torch.nn.modules.container.ParameterDict"),
        (ModelCheckpointStandIn, f"{LIGHTNING_MODULE}.ModelCheckpoint"),
        (_LIGHTNING_STAND_IN_MODULE, LIGHTNING_MODULE),
    ]


class _Probe:
    """A class that only the probe's allow-list entry names."""


@functools.lru_cache(maxsize=1)
def can_name_globals() -> bool:
    """Whether this torch accepts ``(object, "qualified.name")`` pairs in ``safe_globals`` (torch 2.6+).

    Found by asking torch which globals of a tiny in-memory file naming :class:`_Probe` it would refuse, not by
    comparing version numbers.  Nothing is unpickled, and ``torch.load`` is not called: inside the WebUI it is the
    WebUI's own checker, which would refuse the probe and print an alarm.
    """
    import io

    import torch

    serialization = torch.serialization
    if not hasattr(serialization, "safe_globals") or not hasattr(serialization, "get_unsafe_globals_in_checkpoint"):
        return False
    buffer = io.BytesIO()
    torch.save({"probe": _Probe}, buffer)
    buffer.seek(0)
    try:
        with serialization.safe_globals([(_Probe, f"{_Probe.__module__}.{_Probe.__qualname__}")]):
            return serialization.get_unsafe_globals_in_checkpoint(buffer) == []
    except Exception:  # any failure means: not supported by this torch
        return False


class _allowing_webui_globals:
    """Add the WebUI's extra globals to torch's allow-list for one load; remove exactly those added afterwards.

    Entries the caller already allowed (``add_safe_globals``) are left as they were.
    """

    def __enter__(self) -> None:
        import torch

        self.added: list[tuple[Any, str]] = []
        if not can_name_globals():
            return
        present = set(torch.serialization.get_safe_globals())
        self.added = [entry for entry in webui_allow_list() if entry not in present]
        self.context = torch.serialization.safe_globals(self.added)
        self.context.__enter__()

    def __exit__(self, *exc: Any) -> None:
        if self.added:
            self.context.__exit__(*exc)


def _refusal_reason(error: BaseException) -> str:
    """What the pickle asked for, in a few words, from torch's message (without its advice to load unsafely)."""
    text = str(error)
    named = re.search(r"GLOBAL\s+([\w.]+)", text)
    if named:
        return f"it names '{named.group(1)}', which is not a tensor, a plain container or an allowed training extra"
    built = re.search(r"but got (<class '[^']+'>|\S+)", text)
    if built:
        return f"it builds an object of type {built.group(1)}, which is not a tensor or a plain container"
    called = re.search(r"unrecognized function (\S+)", text)
    if called:
        return f"it calls {called.group(1)}, which is not a tensor rebuilder"
    return "it holds objects other than tensors and plain containers"


def load_pickle(path: str | os.PathLike, what: str = "file", mmap: bool = False) -> Any:
    """Read a pickled file onto the CPU with torch's restricted unpickler and the WebUI's allow-list.

    ``what`` names the file for people in messages (e.g. "checkpoint", "training state file").  ``mmap``: map the
    tensors' bytes instead of reading them (torch's zip format only; others raise :class:`ModelFileError`).  Raises
    :class:`UnsafeCheckpointError` when the pickle asks for anything else (nothing in it is executed) and
    :class:`ModelFileError` when the file is not a readable torch file.
    """
    import pickle

    import torch

    path = Path(path)
    try:
        with _allowing_webui_globals():
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        extra = ""
        if not can_name_globals():
            extra = f" (this torch {torch.__version__} cannot allow the extras of original .ckpt files; torch 2.6+ can)"
        raise UnsafeCheckpointError(
            f"{path}: refused to load this {what}: {_refusal_reason(error)}{extra}. Nothing in it was run; "
            "use a .safetensors version of it instead."
        ) from error
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError) as error:
        first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ModelFileError(
            f"{path}: not a readable {what} ({first_line}). It may be truncated or corrupt: download or copy it again."
        ) from error
    if data is None:
        # Inside the WebUI torch.load is its safe unpickler, which returns None (after printing why) on refusal.
        raise UnsafeCheckpointError(
            f"{path}: refused to load this {what}: the WebUI's safe unpickler rejected it (see the console above)."
        )
    return data
