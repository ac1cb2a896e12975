"""LoRA / LoHa / LoKr files in kohya's format: one ``.safetensors`` whose keys are ``LAYER.SUFFIX``.

``LAYER`` is a kohya layer name (:mod:`.names`); the suffixes say the algorithm, as the WebUI's Lora loader reads
them: LoRA ``lora_down.weight`` + ``lora_up.weight`` (+ ``lora_mid.weight``), LoHa ``hada_w1_a`` ... ``hada_w2_b``
(+ ``hada_t1`` / ``hada_t2``), LoKr ``lokr_w1`` or ``lokr_w1_a``/``_b`` and ``lokr_w2`` or ``lokr_w2_a``/``_b``
(+ ``lokr_t2``); each layer may have an ``alpha`` (a 0-d tensor; the delta is scaled by alpha / rank).

Writes are atomic (a hidden ``.NAME.safetensors.XXXX.tmp`` the WebUI never lists, renamed into place) and carry
kohya's two hashes in the metadata (``sshs_model_hash``, ``sshs_legacy_hash``: what the WebUI computes itself as
the file's hash, so it need not read the file again for its "Lora hashes" infotext).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from .names import split_key

# The suffixes that make a layer one of each algorithm (the WebUI's module types, in the order it tries them).
REQUIRED = {
    "lora": ({"lora_up.weight", "lora_down.weight"},),
    "loha": ({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"},),
    "lokr": ({"lokr_w1", "lokr_w2"}, {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, {"lokr_w1_a", "lokr_w1_b", "lokr_w2"},
             {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}),
}  # fmt: skip
OPTIONAL = {
    "lora": {"lora_mid.weight", "alpha", "scale", "dora_scale"},
    "loha": {"hada_t1", "hada_t2", "alpha", "dora_scale"},
    "lokr": {"lokr_t2", "alpha", "dora_scale"},
}
FORBIDDEN_IN_NAME = ":>="  # the WebUI's prompt syntax <lora:NAME:WEIGHT> cannot name a file with these
LEGACY_HASH_OFFSET, LEGACY_HASH_LENGTH = 0x100000, 0x10000


@dataclass
class NetworkFile:
    """A LoRA file read into memory: tensors by key, metadata, and each layer's algorithm."""

    path: Path
    tensors: dict[str, Any]
    metadata: dict[str, str] = field(default_factory=dict)
    layer_algorithms: dict[str, str] = field(default_factory=dict)  # layer name -> "lora" / "loha" / "lokr"

    @property
    def layers(self) -> set[str]:
        return set(self.layer_algorithms)

    @property
    def algorithm(self) -> str:
        """ "lora", "loha" or "lokr"; "mixed" when the layers differ (LyCORIS can write such files)."""
        kinds = set(self.layer_algorithms.values())
        return kinds.pop() if len(kinds) == 1 else "mixed"

    def layer(self, name: str) -> dict[str, Any]:
        """The tensors of one layer by suffix, e.g. {"lora_down.weight": ..., "alpha": ...}."""
        prefix = name + "."
        return {key[len(prefix) :]: value for key, value in self.tensors.items() if key.startswith(prefix)}

    def alpha(self, name: str) -> float | None:
        value = self.tensors.get(f"{name}.alpha")
        return None if value is None else float(value)


def algorithm_of(suffixes: set[str]) -> str | None:
    """The algorithm whose required suffixes one layer's keys have (and nothing foreign), else None."""
    for algorithm, alternatives in REQUIRED.items():
        for required in alternatives:
            if required <= suffixes and suffixes <= required | OPTIONAL[algorithm]:
                return algorithm
    return None


def _layer_algorithms(path: Path, keys: list[str]) -> dict[str, str]:
    suffixes: dict[str, set[str]] = {}
    for key in keys:
        name, suffix = split_key(key)
        suffixes.setdefault(name, set()).add(suffix)
    algorithms = {}
    for name, found in suffixes.items():
        algorithm = algorithm_of(found)
        if algorithm is None:
            raise ModelFileError(
                f"{path}: the keys of layer {name!r} ({', '.join(sorted(found))}) are no LoRA, LoHa or LoKr layer. "
                "Is this a LoRA file (not a full checkpoint or an embedding)?"
            )
        algorithms[name] = algorithm
    return algorithms


def read_network_file(path: str | os.PathLike) -> NetworkFile:
    """Read a LoRA / LoHa / LoKr ``.safetensors`` file (tensors on the CPU); one sentence when it is none."""
    from ..models.files import read_state_dict

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(
            f"{path}: LoRA files are read as .safetensors only ({path.suffix or 'no extension'} given); a .pt / .ckpt "
            "LoRA can run code when loaded: convert it to .safetensors first."
        )
    tensors, metadata = read_state_dict(path)
    if not tensors:
        raise ModelFileError(f"{path}: the file holds no tensors, so it is no LoRA file.")
    if any(key.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.")) for key in tensors):
        raise ModelFileError(f"{path}: this is a full Stable Diffusion checkpoint, not a LoRA file.")
    return NetworkFile(path, tensors, metadata, _layer_algorithms(path, list(tensors)))


def check_network_name(path: str | os.PathLike) -> None:
    """Refuse a file name the WebUI's ``<lora:NAME:WEIGHT>`` prompt syntax cannot name."""
    stem = Path(path).stem
    bad = sorted({c for c in stem if c in FORBIDDEN_IN_NAME})
    if bad:
        raise ModelFileError(
            f"{path}: a LoRA file's name may not contain {' '.join(repr(c) for c in bad)}: the WebUI's "
            "<lora:NAME:WEIGHT> prompt tag could not name it. Choose another model name."
        )


def network_hashes(tensors: dict[str, Any], metadata: dict[str, str]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` (sha256 of the tensor data section written with the ``ss_*`` metadata only) and
    ``sshs_legacy_hash`` (first 8 hex of the sha256 of 64 KiB at 1 MiB into that file): the hashes the WebUI
    computes for a LoRA file (its addnet hash)."""
    from safetensors.torch import save

    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(blob[8 + header :]).hexdigest()
    legacy = hashlib.sha256(blob[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]).hexdigest()[:8]
    return {"sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}


def write_network_file(path: str | os.PathLike, tensors: dict[str, Any], metadata: dict[str, str]) -> Path:
    """Write a kohya-format LoRA file atomically (CPU, contiguous tensors; metadata values must be strings)."""
    from safetensors.torch import save_file

    from ..models.files import atomic_path

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelFileError(f"{path}: LoRA files are written as .safetensors.")
    check_network_name(path)
    _layer_algorithms(path, list(tensors))  # never write a file the WebUI would not read
    not_text = sorted(k for k, v in metadata.items() if not isinstance(v, str))
    if not_text:
        raise ValueError(f"metadata values must be strings: {not_text}")
    cpu = {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}
    full = {**metadata, **network_hashes(cpu, metadata)}
    with atomic_path(path) as temp:
        save_file(cpu, str(temp), metadata=full)
    return path
