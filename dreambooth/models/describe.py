"""What a checkpoint is, read cheaply: for ``.safetensors`` only the header (names, shapes, metadata) is read.

The tab calls this whenever the base model changes, so it must not load gigabytes.  A ``.ckpt`` has no header:
its tensors are read (safely) as training would.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import ModelFileError, UnsupportedModelError
from . import files
from .architecture import Architecture, detect_architecture


def _shapes_only(path: Path) -> tuple[dict, dict[str, str]]:
    """Meta-device tensors with the file's names and shapes, and its metadata; no tensor data is read."""
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            shapes = {key: handle.get_slice(key).get_shape() for key in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise ModelFileError(f"{path}: not a readable safetensors file ({error}).") from error
    return {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}, metadata


def architecture_of(path: str | os.PathLike) -> Architecture:
    """The architecture of a single file (sidecar yaml honoured) or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        from .components import arch_from_diffusers_configs

        return arch_from_diffusers_configs(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file or folder.")
    if path.suffix.lower() == ".safetensors":
        state_dict, metadata = _shapes_only(path)
    else:
        state_dict, metadata = files.read_state_dict(path)
    yaml_path = files.sidecar_yaml_path(path)
    yaml_config = files.read_yaml(yaml_path) if yaml_path.is_file() else None
    return detect_architecture(state_dict, str(path), yaml_config=yaml_config, metadata=metadata)


def describe_checkpoint(path: str | os.PathLike) -> str:
    """Two lines for people: family, prediction type and where it came from, and the network sizes."""
    return describe_architecture(architecture_of(path))


def describe_architecture(arch: Architecture) -> str:
    """:func:`describe_checkpoint`'s lines for an architecture already read."""
    text = f"text encoder {arch.text['num_hidden_layers']} layers of {arch.text['hidden_size']}"
    if arch.text_2:
        text += f" + {arch.text_2['num_hidden_layers']} layers of {arch.text_2['hidden_size']}"
    return (
        f"**{arch.name}**, {arch.prediction_type} (from {arch.prediction_source})  \n"
        f"UNet channels {arch.unet['block_out_channels']}, {text}"
        f"{'; needs a sidecar .yaml in the WebUI' if arch.needs_sidecar_yaml else ''}"
    )


def unsupported_family(path: str | os.PathLike) -> str | None:
    """The reason a base model is of a family that cannot be trained yet (SD3, Flux...), else None.

    Cheap enough for settings validation: a folder's configs or a ``.safetensors`` header are read; a pickled
    ``.ckpt`` (no header) is left to loading, and any other problem with the file is reported when it is loaded.
    """
    path = Path(path)
    if not (path.is_dir() or path.suffix.lower() == ".safetensors"):
        return None
    try:
        architecture_of(path)
    except UnsupportedModelError as error:
        return str(error)
    except ModelFileError:
        return None
    return None
