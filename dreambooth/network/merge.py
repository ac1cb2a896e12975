"""Merge a LoRA / LoHa / LoKr file into a checkpoint: the weights the WebUI computes when it applies the file.

Each layer's delta is rebuilt by LyCORIS's functional code (``lycoris.functional``: up @ down, with a Tucker
``lora_mid``; the Hadamard product of LoHa; the Kronecker product of LoKr) and scaled as the WebUI's Lora loader
scales it (v1.10.1 ``network.py``): by the ``scale`` key if present, else ``alpha / dim``, else 1, where dim is
LoRA's ``lora_down`` rank, LoHa's ``hada_w1_b`` rank and LoKr's ``lokr_w1_b`` / ``lokr_w2_b`` rank (a LoKr with
both factors full has no dim: scale 1).  Then ``weight`` (the ``<lora:NAME:WEIGHT>`` multiplier) multiplies it.
The deltas are added in fp32.  (LyCORIS's own ``get_diff_weight`` / ``merge_to`` apply the LoHa / LoKr scale twice
in 4.1.3, so they are not used.)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..compat import quiet_bitsandbytes
from ..errors import DreamBoothError, ModelFileError
from .files import NetworkFile, read_network_file
from .names import TEXT_PREFIX, Target, all_layers

TEXT_ALIAS = "lora_te1_"  # the single text encoder of SD 1.x / 2.x named as SDXL's first
MERGED_KEY = "dreambooth.merged_networks"  # metadata: JSON list of the files merged into a checkpoint, in order
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")


class NetworkMismatchError(ModelFileError):
    """A LoRA file does not fit the model it is applied to (another family, other shapes)."""


@dataclass
class MergeReport:
    """What :func:`merge_lora` wrote."""

    written: list[Path]
    layers: int  # layers of the LoRA merged
    text_layers: int  # of which in the text encoder
    weight: float
    algorithm: str

    def summary(self) -> str:
        unet = self.layers - self.text_layers
        lines = [
            f"merged {self.layers} {self.algorithm} layer(s) at weight {self.weight:g} "
            f"({unet} in the UNet, {self.text_layers} in the text encoder(s))",
            *(f"wrote {path}" for path in self.written),
        ]
        return "\n".join(lines)


def _lycoris() -> Any:
    with quiet_bitsandbytes():  # lycoris imports bitsandbytes, which prints a notice about an optional kernel
        from lycoris.functional import locon, loha, lokr
    return locon, loha, lokr


def _rank(algorithm: str, parts: dict[str, Any]) -> int | None:
    """The WebUI's ``dim`` of a layer (None: LoKr with both factors full)."""
    if algorithm == "lora":
        return int(parts["lora_down.weight"].shape[0])
    if algorithm == "loha":
        return int(parts["hada_w1_b"].shape[0])
    for key in ("lokr_w1_b", "lokr_w2_b"):
        if key in parts:
            return int(parts[key].shape[0])
    return None


def layer_scale(algorithm: str, parts: dict[str, Any]) -> float:
    """The factor the WebUI multiplies a layer's rebuilt delta by before the prompt's weight (alpha / dim)."""
    if "scale" in parts:
        return float(parts["scale"])
    rank = _rank(algorithm, parts)
    if "alpha" in parts and rank:
        return float(parts["alpha"]) / rank
    return 1.0


def rebuilt_delta(algorithm: str, parts: dict[str, Any], scale: float) -> Any:
    """``scale`` x the layer's delta from its factors (fp32, on the factors' device), in the factors' own shape
    (LoHa / LoKr keep a convolution flattened to 2-D; the caller reshapes to the layer)."""
    import torch

    locon, loha, lokr = _lycoris()
    t = {k: v.to(torch.float32) for k, v in parts.items() if isinstance(v, torch.Tensor)}
    if algorithm == "lora":
        return locon.diff_weight(
            t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight"), gamma=scale, backend="torch"
        )
    if algorithm == "loha":
        weights = (t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t.get("hada_t1"), t.get("hada_t2"))
        return loha.diff_weight(*weights, gamma=scale, backend="torch")
    # kron_weight takes the scale itself; lokr.diff_weight would divide gamma by a rank of its own reckoning
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
    return lokr.kron_weight(*(t.get(n) for n in names), scale=scale, backend="torch")


def _fits(delta: Any, weight: Any, algorithm: str, parts: dict[str, Any]) -> bool:
    """Whether the file's layer is one for ``weight``: same output and input sizes, and the same kind of layer
    where the factors tell it: a LoRA keeps a convolution's 4-D shape, even 1x1, so a Linear LoRA on a 1x1
    convolution comes from a model with linear projections (SD 2.x), and the other way round; LoHa and LoKr may
    flatten a convolution, but a 4-D delta never belongs to a Linear layer."""
    if delta.shape[0] != weight.shape[0] or delta.numel() != weight.numel():
        return False
    if algorithm == "lora":
        return parts["lora_down.weight"].dim() == weight.dim()
    return delta.dim() <= weight.dim()


def _shape(tensor: Any) -> str:
    return "x".join(str(s) for s in tensor.shape)


def layer_deltas(
    network: NetworkFile | str | os.PathLike,
    layers: dict[str, Target],
    weight: float = 1.0,
    model_name: str = "the model",
) -> dict[str, Any]:
    """Per layer name, the fp32 delta the WebUI adds to that layer's weight for ``<lora:NAME:weight>``.

    ``layers``: the model's layers by kohya name (:func:`.names.all_layers`); ``model_name`` names the model in
    the one sentence raised when the file names a layer the model lacks or a layer of another shape.
    """
    import torch

    network = network if isinstance(network, NetworkFile) else read_network_file(network)
    unknown = sorted(name for name in network.layers if _model_layer(name, layers) is None)
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        sdxl_model = "lora_unet_input_blocks_0_0" in layers  # conv_in by its sgm name: the model is SDXL
        example = "an SD 1.x / 2.x LoRA on SDXL" if sdxl_model else "an SDXL LoRA on SD 1.5"
        raise NetworkMismatchError(
            f"{network.path}: its layer {unknown[0]}{more} is not a layer of {model_name}; the LoRA was made for "
            f"another kind of model (e.g. {example}): merge it into a model of the family it was trained on."
        )
    deltas: dict[str, Any] = {}
    mismatched: list[str] = []  # "NAME has the shape A in the file but B in MODEL", one per layer
    for name in sorted(network.layers):
        algorithm, parts = network.layer_algorithms[name], network.layer(name)
        if "dora_scale" in parts:
            raise ModelFileError(
                f"{network.path}: layer {name} is a DoRA layer (dora_scale), which merging does not support; "
                "use the LoRA in the WebUI's prompt instead."
            )
        model_layer = _model_layer(name, layers)
        target = layers[model_layer].module.weight
        delta = rebuilt_delta(algorithm, parts, layer_scale(algorithm, parts) * float(weight))
        if not _fits(delta, target, algorithm, parts):
            mismatched.append(f"{name} has the shape {_shape(delta)} in the file but {_shape(target)} in {model_name}")
            continue
        deltas[model_layer] = deltas.get(model_layer, 0) + delta.reshape(target.shape).to(torch.float32)
    if mismatched:
        more = f" (and {len(mismatched) - 1} more layers)" if len(mismatched) > 1 else ""
        raise NetworkMismatchError(
            f"{network.path}: layer {mismatched[0]}{more}; the LoRA was made for another model (e.g. an SD 2.x LoRA "
            "on an SD 1.x model): merge it into a model of the family it was trained on."
        )
    return deltas


def _model_layer(name: str, layers: dict[str, Target]) -> str | None:
    """The model's layer a file's layer name means: the name itself, or for ``lora_te1_`` (what diffusers'
    ``convert_state_dict_to_kohya`` writes for SD 1.x / 2.x) the ``lora_te_`` layer, as the WebUI maps it."""
    if name in layers:
        return name
    if name.startswith(TEXT_ALIAS) and TEXT_PREFIX + name[len(TEXT_ALIAS) - 1 :] in layers:
        return TEXT_PREFIX + name[len(TEXT_ALIAS) - 1 :]
    return None


def _family_problem(network: NetworkFile, family: str, model_name: str) -> str:
    """A sentence when the file's kohya metadata says it was trained on another family than the model's."""
    meta = network.metadata
    version = meta.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        trained = "sdxl"
    elif meta.get("ss_v2") == "True" or version.startswith("sd_v2"):
        trained = "sd2"
    elif meta.get("ss_v2") == "False" or version.startswith("sd_v1"):
        trained = "sd1"
    else:
        return ""
    if trained == family:
        return ""
    names = {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL"}
    return (
        f"{network.path}: the LoRA was trained on {names[trained]} (its metadata says so) but {model_name} is "
        f"{names.get(family, family)}: merge it into a model of the family it was trained on."
    )


def _merged_before(base: Path) -> list[Any]:
    """The list of merges the base's own metadata records (a checkpoint we merged into before), else []."""
    if base.suffix.lower() != ".safetensors" or not base.is_file():
        return []
    from safetensors import safe_open

    try:
        with safe_open(str(base), framework="pt") as handle:
            recorded = (handle.metadata() or {}).get(MERGED_KEY, "[]")
        merged = json.loads(recorded)
    except (OSError, ValueError, RuntimeError):
        return []
    return merged if isinstance(merged, list) else []


def file_hash(path: Path) -> str:
    """The WebUI's hash of a LoRA file (its "addnet" hash, kohya's ``sshs_model_hash``): sha256 of the bytes after
    the safetensors header."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as handle:
        header = int.from_bytes(handle.read(8), "little")
        handle.seek(8 + header)
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an output that is no single checkpoint file, or that exists unless ``overwrite``."""
    if out.suffix.lower() not in SINGLE_FILE_SUFFIXES:
        raise DreamBoothError(f"{out}: the merged checkpoint is written as one file; end its name in .safetensors.")
    if out.is_dir() or (out.exists() and not overwrite):
        raise DreamBoothError(f"{out}: already exists; nothing was written (choose a new name, or allow overwriting).")


def merge_lora(
    base: str | os.PathLike,
    lora: str | os.PathLike,
    out: str | os.PathLike,
    weight: float = 1.0,
    half: bool = False,
    overwrite: bool = False,
) -> MergeReport:
    """Write ``out``: the checkpoint ``base`` with the LoRA / LoHa / LoKr file ``lora`` merged in at ``weight``.

    Every tensor of the base that the LoRA does not touch is written as it was (converted to fp16 with ``half``);
    the metadata records the merge (file name, hash, weight).  Nothing is written when the file does not fit.
    """
    import math

    from ..models.components import load_components, save_single_file

    base, out = Path(base), Path(out)
    if not math.isfinite(float(weight)):
        raise DreamBoothError(f"weight {weight}: give a number, e.g. 1 or 0.5.")
    check_output(out, overwrite)
    network = read_network_file(lora)
    if not base.exists():
        raise ModelFileError(f"{base}: no such file or folder; give the checkpoint to merge into.")
    components = load_components(base)
    model_name = f"{base.name} ({components.arch.name})"
    problem = _family_problem(network, components.arch.family, model_name)
    if problem:
        raise NetworkMismatchError(problem)
    layers = all_layers(components.unet, components.text_encoder, components.text_encoder_2)
    deltas = layer_deltas(network, layers, weight, model_name)
    for name, delta in deltas.items():
        layers[name].module.weight.data += delta.to(layers[name].module.weight.device)
    record = {
        "file": Path(lora).name,
        "hash": file_hash(network.path),
        "weight": float(weight),
        "algorithm": network.algorithm,
        "layers": len(deltas),
    }
    metadata = {MERGED_KEY: json.dumps([*_merged_before(base), record])}
    written = save_single_file(components, out, half=half, metadata=metadata)
    text = sum(1 for name in deltas if layers[name].is_text)
    return MergeReport(written, len(deltas), text, float(weight), network.algorithm)
