"""Mirrors ``modules/sd_vae.py`` (v1.10.1): which VAE is loaded into the model.

Module globals as in the real one: ``base_vae`` (state dict of the checkpoint's own ``first_stage_model``, kept while
an external VAE is loaded), ``loaded_vae_file`` (path or None), ``checkpoint_info`` (whose ``base_vae`` it is),
``vae_dict`` (name -> file), ``vae_path``. ``load_vae`` also sets ``model.base_vae`` / ``model.loaded_vae_file``.
Simplified ``resolve_vae``: ``--vae-path``, else the ``sd_vae`` setting when it names a file in ``vae_dict`` (after
``refresh_vae_list()``), else a ``<checkpoint>.vae.safetensors|.vae.pt|.vae.ckpt`` beside the checkpoint when
``sd_vae`` is Automatic, else none (no per-model user metadata). Tests select a VAE with
``sd_vae.reload_vae_weights(vae_file=path)`` (the real function, also called by the ``sd_vae`` setting).
"""

# Mirrors the real module, which works with os.path strings:
# ruff: noqa: PTH100, PTH113, PTH118, PTH119, PTH122, PTH207

from __future__ import annotations

import collections
import glob
import os
from copy import deepcopy
from dataclasses import dataclass
from typing import Any

from modules import devices, fake, paths, script_callbacks, shared

vae_path = os.path.abspath(os.path.join(paths.models_path, "VAE"))
vae_ignore_keys = {"model_ema.decay", "model_ema.num_updates"}
vae_dict: dict[str, str] = {}

base_vae: dict[str, Any] | None = None
loaded_vae_file: str | None = None
checkpoint_info: Any = None

checkpoints_loaded: collections.OrderedDict[str, dict[str, Any]] = collections.OrderedDict()

unspecified = object()


@dataclass
class VaeResolution:
    vae: str | None = None
    source: str | None = None
    resolved: bool = True

    def tuple(self) -> tuple[str | None, str | None]:
        return self.vae, self.source


def get_loaded_vae_name() -> str | None:
    return None if loaded_vae_file is None else os.path.basename(loaded_vae_file)


def get_base_vae(model: Any) -> dict[str, Any] | None:
    if base_vae is not None and checkpoint_info == model.sd_checkpoint_info and model:
        return base_vae
    return None


def store_base_vae(model: Any) -> None:
    global base_vae, checkpoint_info
    if checkpoint_info != model.sd_checkpoint_info:
        assert not loaded_vae_file, "Trying to store non-base VAE!"
        base_vae = deepcopy(model.first_stage_model.state_dict())
        checkpoint_info = model.sd_checkpoint_info


def delete_base_vae() -> None:
    global base_vae, checkpoint_info
    base_vae = None
    checkpoint_info = None


def restore_base_vae(model: Any) -> None:
    global loaded_vae_file
    if base_vae is not None and checkpoint_info == model.sd_checkpoint_info:
        _load_vae_dict(model, base_vae)
        loaded_vae_file = None
    delete_base_vae()


def refresh_vae_list() -> None:
    """Real: scans ``models/VAE`` (and ``--vae-dir``, the checkpoint folders) for .pt/.ckpt/.safetensors."""
    vae_dict.clear()
    for pattern in ("**/*.pt", "**/*.ckpt", "**/*.safetensors"):
        for filepath in sorted(glob.iglob(os.path.join(vae_path, pattern), recursive=True)):
            vae_dict[os.path.basename(filepath)] = filepath


def is_automatic() -> bool:
    return shared.opts.sd_vae in {"Automatic", "auto"}


def find_vae_near_checkpoint(checkpoint_file: str) -> str | None:
    checkpoint_path = os.path.splitext(checkpoint_file)[0]
    for vae_file in [f"{checkpoint_path}.vae.pt", f"{checkpoint_path}.vae.ckpt", f"{checkpoint_path}.vae.safetensors"]:
        if os.path.isfile(vae_file):
            return vae_file
    return None


def resolve_vae(checkpoint_file: str) -> VaeResolution:
    if shared.cmd_opts.vae_path is not None:
        return VaeResolution(shared.cmd_opts.vae_path, "from commandline argument")
    if shared.opts.sd_vae == "None":
        return VaeResolution()
    vae_from_options = vae_dict.get(shared.opts.sd_vae)
    if vae_from_options is not None:
        return VaeResolution(vae_from_options, "specified in settings")
    near = find_vae_near_checkpoint(checkpoint_file)
    if near is not None and (not shared.opts.sd_vae_overrides_per_model_preferences or is_automatic()):
        return VaeResolution(near, "found near the checkpoint")
    return VaeResolution()


def load_vae_dict(filename: str, map_location: Any = None) -> dict[str, Any]:
    from modules import sd_models

    vae_ckpt = sd_models.read_state_dict(filename, map_location=map_location)
    return {k: v for k, v in vae_ckpt.items() if k[0:4] != "loss" and k not in vae_ignore_keys}


def load_vae(model: Any, vae_file: str | None = None, vae_source: str = "from unknown source") -> None:
    global loaded_vae_file
    fake.record("sd_vae.load_vae", vae_file=vae_file, vae_source=vae_source)

    if vae_file:
        assert os.path.isfile(vae_file), f"VAE {vae_source} doesn't exist: {vae_file}"
        store_base_vae(model)
        _load_vae_dict(model, load_vae_dict(vae_file, map_location=shared.weight_load_location))
        vae_dict.setdefault(os.path.basename(vae_file), vae_file)
    elif loaded_vae_file:
        restore_base_vae(model)

    loaded_vae_file = vae_file
    model.base_vae = base_vae
    model.loaded_vae_file = loaded_vae_file


def _load_vae_dict(model: Any, vae_dict_1: dict[str, Any]) -> None:
    """Real: ``model.first_stage_model.load_state_dict(vae_dict_1)`` (strict), then cast to ``devices.dtype_vae``.
    The fake also accepts keys prefixed with ``first_stage_model.``."""
    prefix = "first_stage_model."
    cleaned = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in vae_dict_1.items()}
    model.first_stage_model.load_state_dict(cleaned)
    model.first_stage_model.to(devices.dtype_vae)


def clear_loaded_vae() -> None:
    global loaded_vae_file
    loaded_vae_file = None


def reload_vae_weights(sd_model: Any = None, vae_file: Any = unspecified) -> Any:
    from modules import sd_hijack

    if not sd_model:
        sd_model = shared.sd_model

    checkpoint_file = sd_model.sd_checkpoint_info.filename

    if vae_file is unspecified:
        vae_file, vae_source = resolve_vae(checkpoint_file).tuple()
    else:
        vae_source = "from function argument"

    if loaded_vae_file == vae_file:
        return None

    sd_model.to(devices.cpu)
    sd_hijack.model_hijack.undo_hijack(sd_model)
    load_vae(sd_model, vae_file, vae_source)
    sd_hijack.model_hijack.hijack(sd_model)
    if not sd_model.lowvram:
        sd_model.to(devices.device)
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


def reset() -> None:
    """Fake only: no VAE loaded, empty lists."""
    global base_vae, loaded_vae_file, checkpoint_info
    base_vae = None
    loaded_vae_file = None
    checkpoint_info = None
    vae_dict.clear()
    checkpoints_loaded.clear()
