"""Reading and writing checkpoint files: safe loading, atomic writes, the WebUI's sidecar yaml.

* ``.safetensors`` is read with safetensors (no code can run); the header's metadata is returned too.
* ``.ckpt`` / ``.pt`` is read by :func:`.safe_pickle.load_pickle` (``torch.load(weights_only=True)`` with the
  WebUI's allow-list for original SD checkpoints): a pickle that asks for anything else is refused with
  :class:`UnsafeCheckpointError` and never executed.  ``torch.load`` itself is not patched.
* Writes go to a temporary file in the destination folder, are flushed to disk, then renamed over the destination:
  a crash or a full disk never leaves a truncated model behind.
* ``.ckpt`` is written in torch's legacy (non-zip) format, the one the WebUI's own safe unpickler accepts.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ModelFileError

SAFETENSORS_SUFFIXES = {".safetensors"}
PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, str]]:
    """Read all tensors of a single-file checkpoint onto the CPU; returns (state dict, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file. Give the path of a .safetensors or .ckpt checkpoint.")
    if path.stat().st_size == 0:
        raise ModelFileError(f"{path}: the file is empty (0 bytes); it was probably not downloaded completely.")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _read_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _read_pickle(path), {}
    raise ModelFileError(f"{path}: unknown checkpoint type '{suffix}'; expected .safetensors or .ckpt.")


def _read_safetensors(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ModelFileError(
            f"{path}: not a readable safetensors file ({error}). It may be truncated or corrupt: "
            "download or copy it again."
        ) from error
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, Any]:
    import torch

    from .safe_pickle import load_pickle

    data = load_pickle(path, "checkpoint")
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]  # original .ckpt: epoch, global_step, callbacks, ... beside the weights
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: the checkpoint holds a {type(data).__name__}, not a dictionary of tensors.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


@contextlib.contextmanager
def atomic_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``destination``; on success it replaces ``destination`` atomically.

    On any error the temporary file is removed and ``destination`` is left as it was.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = _new_temp_file(destination)
    try:
        yield temp
        with temp.open("rb+") as written:
            os.fsync(written.fileno())
        temp.replace(destination)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _new_temp_file(destination: Path) -> Path:
    """An empty new ``.NAME.XXXXXXXX.tmp`` beside ``destination``, with the mode any new file gets (0666 less the
    umask); mkstemp's 0600 would make every output unreadable to the other accounts that read the model folder."""
    for _ in range(100):
        temp = destination.with_name(f".{destination.name}.{secrets.token_hex(4)}.tmp")
        try:
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return temp
    raise FileExistsError(f"{destination.parent}: no free temporary file name for {destination.name}")


def write_state_dict(
    state_dict: dict[str, Any], destination: str | os.PathLike, metadata: dict[str, str] | None = None
) -> Path:
    """Write tensors as ``.safetensors`` (with metadata) or legacy-format ``.ckpt``, atomically."""
    import torch

    destination = Path(destination)
    suffix = destination.suffix.lower()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    with atomic_path(destination) as temp:
        if suffix in SAFETENSORS_SUFFIXES:
            from safetensors.torch import save_file

            save_file(_unshare(tensors), str(temp), metadata=metadata or {})
        elif suffix in PICKLE_SUFFIXES:
            # The WebUI's safe unpickler accepts only data.pkl / version / data/N in a zip, or the legacy format.
            torch.save({"state_dict": tensors}, str(temp), _use_new_zipfile_serialization=False)
        else:
            raise ModelFileError(f"{destination}: unknown output type '{suffix}'; use .safetensors or .ckpt.")
    return destination


def _unshare(tensors: dict[str, Any]) -> dict[str, Any]:
    """safetensors refuses tensors that share memory (e.g. chunks of one in_proj): give each its own storage."""
    seen: set[int] = set()
    out = {}
    for key, tensor in tensors.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        if pointer in seen or tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            tensor = tensor.clone()
        seen.add(pointer)
        out[key] = tensor
    return out


def sidecar_yaml_path(checkpoint: str | os.PathLike) -> Path:
    """``NAME.yaml`` beside ``NAME.safetensors``: the WebUI's place for a model's config."""
    return Path(checkpoint).with_suffix(".yaml")


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: cannot read the model config yaml ({error}).") from error
    if not isinstance(data, dict) or "model" not in data:
        raise ModelFileError(f"{path}: not an ldm model config (no top-level 'model' section).")
    return data


def write_yaml(data: dict[str, Any], destination: str | os.PathLike) -> Path:
    import yaml

    with atomic_path(destination) as temp:
        temp.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return Path(destination)
