"""The peak GPU memory of a training configuration, from a dry run of the trainer's own steps (no GPU needed).

``estimate(settings)`` reads the base model's *architecture* only (a safetensors header, a ``.ckpt``'s pickle with
its tensors memory-mapped and never touched, a diffusers folder's configs), builds its modules without weights and
runs two training steps on fake tensors under a :class:`~.tracker.MemoryTracker` (see :mod:`.dryrun`).  The result
is the peak of live tensor bytes, what ``torch.cuda.max_memory_allocated`` reports, with its breakdown, plus the
constants a GPU needs beyond it (:data:`CUDA_CONTEXT_BYTES`, :func:`allocator_bytes`): ``total_bytes`` is what the
card must have free.  ``ARCH_SHORTCUTS`` names the released architectures for a quick look without a file.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from ..models.architecture import SD_SCALE_FACTOR, SD_SCHEDULE, Architecture, released_vae
from ..models.sdxl import standard_sdxl_architecture

GIB = 2**30

# The CUDA context (driver state, the kernels of torch, cuBLAS and cuDNN loaded lazily): about 0.3-0.5 GiB on
# current drivers with CUDA's lazy module loading.  It is GPU memory, but not in max_memory_allocated.
CUDA_CONTEXT_BYTES = 400 * 2**20
# Memory that operators ask the caching allocator for inside a kernel, which the dry run does not see: cuBLAS keeps
# a workspace per stream (torch's default, 8 x 4 MiB on recent GPUs) and cuDNN's convolution algorithms take
# workspaces of up to about 200 MiB for SD's convolutions at 512-768 px.
WORKSPACE_BYTES = 256 * 2**20
# The caching allocator keeps freed blocks for reuse and splits blocks: what it has reserved runs some percent
# above what is allocated at the peak (5-10% in training loops; the lower end with expandable segments).
FRAGMENTATION = 0.05


def allocator_bytes(peak_bytes: int) -> int:
    """Workspaces and the allocator's unused block space at a peak of ``peak_bytes`` (see the constants above)."""
    return WORKSPACE_BYTES + int(FRAGMENTATION * peak_bytes)


@dataclass
class Estimate:
    """``peak_bytes``: the tracked peak (what ``torch.cuda.max_memory_allocated`` would show); ``breakdown``: that
    peak by label (weights trained / frozen by dtype, gradients, optimizer states, activations and temporaries,
    cached text embeddings), summing to it; ``constants``: GPU memory beyond it; ``seconds``: the estimate's time."""

    peak_bytes: int
    breakdown: dict[str, int]
    constants: dict[str, int]
    arch_name: str
    seconds: float

    @property
    def total_bytes(self) -> int:
        """What the GPU must have free: the peak and the constants."""
        return self.peak_bytes + sum(self.constants.values())


# ------------------------------------------------------------------------------------------------- architectures


def standard_architecture(family: str, v_prediction: bool = False, inpainting: bool = False) -> Architecture:
    """A released SD 1.x / 2.x architecture: the sizes of the real models and the family defaults that
    :func:`~dreambooth.models.architecture.detect_architecture` uses for what weights cannot tell."""
    sd1 = family == "sd1"
    attention = [True, True, True, False]
    unet = {
        "in_channels": 9 if inpainting else 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280, 1280],
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "layers_per_block": 2,
        "cross_attention_dim": 768 if sd1 else 1024,
        "use_linear_projection": not sd1,
        "transformer_layers_per_block": 1,
        "norm_num_groups": 32,
        # SD 1.x: 8 heads; SD 2.x: 64 channels per head (the families' ldm configs)
        "attention_head_dim": 8 if sd1 else [c // 64 for c in (320, 640, 1280, 1280)],
        "sample_size": 96 if v_prediction else 64,
    }
    vae = released_vae(256 if sd1 else 768, SD_SCALE_FACTOR)
    hidden = 768 if sd1 else 1024
    blocks = 12 if sd1 else 24
    text = {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "num_hidden_layers": blocks if sd1 else blocks - 1,  # SD 2.x conditions on the penultimate block
        "num_attention_heads": hidden // 64,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu" if sd1 else "gelu",
        "projection_dim": hidden,
        "pad_token_id": 49407 if sd1 else 0,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }
    return Architecture(
        family=family,
        prediction_type="v_prediction" if v_prediction else "epsilon",
        unet=unet,
        vae=vae,
        text=text,
        text_blocks_in_file=blocks,
        schedule=dict(SD_SCHEDULE),
        scale_factor=SD_SCALE_FACTOR,
        prediction_source="config",
    )


ARCH_SHORTCUTS: dict[str, Architecture] = {
    "sd15": standard_architecture("sd1"),
    "sd21": standard_architecture("sd2", v_prediction=True),
    "sd21-512": standard_architecture("sd2"),
    "sdxl": standard_sdxl_architecture(),  # SDXL base 1.0: two text encoders, the VAE of 1024 px
}


def architecture_of(path: str | os.PathLike) -> Architecture:
    """The architecture of a single file or diffusers folder, without reading its tensors."""
    from ..models import files
    from ..models.architecture import detect_architecture

    path = Path(path)
    if path.is_dir():
        from ..models.components import folder_architecture

        return folder_architecture(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file or folder. Give the base model's checkpoint or diffusers folder.")
    suffix = path.suffix.lower()
    if suffix in files.SAFETENSORS_SUFFIXES:
        shapes, metadata = safetensors_shapes(path)
    elif suffix in files.PICKLE_SUFFIXES:
        shapes, metadata = pickle_shapes(path), {}
    else:
        raise ModelFileError(f"{path}: unknown checkpoint type '{suffix}'; expected .safetensors or .ckpt.")
    yaml_path = files.sidecar_yaml_path(path)
    yaml_config = files.read_yaml(yaml_path) if yaml_path.is_file() else None
    return detect_architecture(shapes, str(path), yaml_config=yaml_config, metadata=metadata)


def safetensors_shapes(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Meta tensors of the shapes in a safetensors header, and its metadata; only the header is read."""
    import torch

    size = path.stat().st_size
    try:
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= min(size - 8, 100 * 2**20):
                raise ValueError(f"header length {length} does not fit a file of {size} bytes")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise ModelFileError(
            f"{path}: not a readable safetensors file ({error}). It may be truncated or corrupt: download or copy "
            "it again."
        ) from error
    metadata = header.pop("__metadata__", None) or {}
    with torch.device("meta"):
        shapes = {k: torch.empty(v["shape"]) for k, v in header.items() if isinstance(v, dict) and "shape" in v}
    return shapes, {str(k): str(v) for k, v in metadata.items()}


def pickle_shapes(path: Path) -> dict[str, Any]:
    """The tensors of a ``.ckpt``, memory-mapped and never read (torch's zip format); an old-format file (torch's
    legacy serialization) cannot be mapped and is read whole."""
    import torch

    from ..models.files import _read_pickle
    from ..models.safe_pickle import load_pickle

    try:
        data = load_pickle(path, "checkpoint", mmap=True)
    except ModelFileError:
        return _read_pickle(path)  # legacy format: the only way is to read it
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: the checkpoint holds a {type(data).__name__}, not a dictionary of tensors.")
    return {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------------------------------------- estimate


def estimate(
    settings: Any,
    arch: Architecture | None = None,
    processes: int = 1,
    device_type: str = "cuda",
    cache_text: bool = True,
) -> Estimate:
    """The peak GPU memory of one training process of ``settings`` (``arch``: the model's architecture, default
    read from ``settings.pretrained_model_name_or_path``; ``processes``: how many train together).

    ``device_type`` is the device the trainer's placement decisions are made for ("cuda"; "cpu" for the CPU
    agreement test, where nothing leaves the device).  ``cache_text``: the trainer's flag of that name (False for
    the benchmark's naive configuration, whose frozen text encoder runs every step).
    """
    from ..train.distributed import BUCKET_BYTES
    from .dryrun import DryRun

    started = time.perf_counter()
    if arch is None:
        arch = architecture_of(settings.pretrained_model_name_or_path)
    arch = copy.deepcopy(arch)
    tracker = DryRun(settings, arch, device_type=device_type, cache_text=cache_text).measure()
    constants = {}
    if device_type == "cuda":
        constants["CUDA context"] = CUDA_CONTEXT_BYTES
        constants["allocator and workspaces"] = allocator_bytes(tracker.peak)
    if processes > 1:
        constants["gradient exchange bucket"] = BUCKET_BYTES
    return Estimate(
        peak_bytes=tracker.peak,
        breakdown=dict(sorted(tracker.breakdown.items(), key=lambda item: -item[1])),
        constants=constants,
        arch_name=arch.name,
        seconds=time.perf_counter() - started,
    )


def format_estimate(e: Estimate) -> str:
    """The estimate as lines: the peak's breakdown, the constants and the total, in GiB."""
    width = max(len(k) for k in [*e.breakdown, *e.constants, "peak of tensors"]) + 2
    lines = [f"Estimated GPU memory ({e.arch_name}; {e.seconds:.1f} s)"]
    lines += [f"  {label:<{width}}{n / GIB:7.2f} GiB" for label, n in e.breakdown.items()]
    lines.append(f"  {'peak of tensors':<{width}}{e.peak_bytes / GIB:7.2f} GiB")
    lines += [f"  + {label:<{width - 2}}{n / GIB:7.2f} GiB" for label, n in e.constants.items()]
    lines.append(f"  {'total':<{width}}{e.total_bytes / GIB:7.2f} GiB")
    return "\n".join(lines)
