"""Diffusers model folders: which family a folder is, and reading its modules without running pickled code.

A folder's weights are ``.safetensors`` (read by diffusers / transformers as usual: no code can run) or, in older
folders, pickles (``diffusion_pytorch_model.bin``, ``pytorch_model.bin``, possibly sharded).  Pickles are read
here by :func:`.safe_pickle.load_pickle`, never by the libraries' own ``torch.load`` (which, with the WebUI's
transformers 4.30 on torch < 2.6, unpickles anything); the module is built from its config and the tensors
loaded into it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, one_line
from .architecture import unsupported
from .safe_pickle import load_pickle

# Weights file names: (safetensors, pickle) for diffusers models and for transformers models.
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
TRANSFORMERS_WEIGHTS = ("model.safetensors", "pytorch_model.bin")

# model_index.json ``_class_name`` prefixes of the pipelines whose models we cannot train (yet).
OTHER_FAMILIES = (
    ("StableDiffusion3", "SD3"),
    ("StableDiffusionUpscale", "SD x4 upscaler"),
    ("StableDiffusionLatentUpscale", "SD latent upscaler"),
    ("StableUnCLIP", "Stable unCLIP"),
    ("StableCascade", "Stable Cascade"),
    ("Flux", "Flux"),
    ("PixArt", "PixArt"),
    ("Kandinsky", "Kandinsky"),
    ("IF", "DeepFloyd IF"),
)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelFileError(f"{path}: not a readable JSON config ({error}).") from error
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: not a config (a JSON object was expected).")
    return data


def check_family(folder: Path) -> str | None:
    """ "sdxl" for an SDXL base folder, None for SD 1.x / 2.x; other families are refused, naming the family.

    Reads only small config files.  SDXL is recognised by its second text encoder or by its UNet's
    ``addition_embed_type`` (models/sdxl.py: the refiner and SDXL inpainting are refused); SD3 / Flux-class models
    by a ``transformer/`` in place of ``unet/``.
    """
    from .sdxl import folder_family

    index = folder / "model_index.json"
    class_name = str(_json(index).get("_class_name", "")) if index.is_file() else ""
    unet_config = folder / "unet" / "config.json"
    unet = _json(unet_config) if unet_config.is_file() else {}
    named = next((family for prefix, family in OTHER_FAMILIES if class_name.startswith(prefix)), None)
    from_index = f"model_index.json names {class_name}"
    if not unet_config.is_file() and (folder / "transformer").is_dir():
        evidence = (
            f"{from_index}, it has transformer/ instead of unet/" if named else "it has transformer/ instead of unet/"
        )
        raise unsupported(str(folder), named or "SD3 / Flux-class", evidence)
    family = folder_family(folder, class_name, unet)
    if family:
        return family
    if named:
        raise unsupported(str(folder), named, from_index)
    return None


def _pickle_weights(folder: Path, names: tuple[str, str]) -> list[Path]:
    """The pickle files holding a module's weights, or [] when the folder has safetensors weights."""
    safetensors, pickle = names
    if (folder / safetensors).is_file() or (folder / f"{safetensors}.index.json").is_file():
        return []
    if (folder / pickle).is_file():
        return [folder / pickle]
    index = folder / f"{pickle}.index.json"
    if index.is_file():
        shards = sorted(set((_json(index).get("weight_map") or {}).values()))
        outside = [s for s in shards if Path(s).name != s]
        if outside:
            raise ModelFileError(f"{index}: the weight map names files outside the folder ({outside[0]}).")
        return [folder / shard for shard in shards]
    return []


def _read_pickles(paths: list[Path], what: str) -> dict[str, Any]:
    import torch

    state: dict[str, Any] = {}
    for path in paths:
        data = load_pickle(path, f"{what} weights file")
        if not isinstance(data, dict):
            raise ModelFileError(f"{path}: holds a {type(data).__name__}, not a dictionary of tensors.")
        state.update({k: v for k, v in data.items() if isinstance(v, torch.Tensor)})
    return state


def load_diffusers_model(cls: Any, folder: Path, what: str) -> Any:
    """A diffusers model (``UNet2DConditionModel``, ``AutoencoderKL``) from its folder; pickles read safely."""
    from ..compat import fix_legacy_diffusers_keys
    from .components import _load_into, _on_meta

    pickles = _pickle_weights(folder, DIFFUSERS_WEIGHTS)
    try:
        if not pickles:
            return cls.from_pretrained(str(folder), local_files_only=True)
        config = cls.load_config(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{folder}: cannot load the {what} ({one_line(error)}).") from error
    state = _read_pickles(pickles, what)
    model = _on_meta(lambda: cls.from_config(config))
    fix_legacy_diffusers_keys(model, state)
    _load_into(model, state, what, str(folder))
    return model


def load_text_encoder(folder: Path, with_projection: bool = False) -> Any:
    """transformers' ``CLIPTextModel`` (``CLIPTextModelWithProjection``: SDXL's second encoder) from its folder;
    pickles read safely."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..compat import TEXT_PREFIX, load_text_encoder_state_dict
    from .components import _materialize_buffers, _on_meta

    model_class = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    pickles = _pickle_weights(folder, TRANSFORMERS_WEIGHTS)
    try:
        if not pickles:
            return model_class.from_pretrained(str(folder), local_files_only=True)
        config = CLIPTextConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as error:
        raise ModelFileError(f"{folder}: cannot load the text encoder ({one_line(error)}).") from error
    state = {
        (k if k.startswith((TEXT_PREFIX, "text_projection.")) else TEXT_PREFIX + k): v
        for k, v in _read_pickles(pickles, "text encoder").items()
        if not k.endswith("position_ids")
    }
    model = _on_meta(lambda: model_class(config))
    try:
        load_text_encoder_state_dict(model, state, assign=True)
    except RuntimeError as error:
        raise ModelFileError(f"{folder}: the text encoder weights do not fit its config: {one_line(error)}") from error
    _materialize_buffers(model, "text encoder", str(folder))
    return model
