"""Mirrors ``modules/paths.py`` (v1.10.1), which re-exports the strings of ``paths_internal``.

The real module also puts the ldm/sgm repositories on ``sys.path`` (and asserts they exist); the fake does not.
Fake only: ``configure(root, models_dir=None)`` moves every path under ``root`` and updates the copies other modules
took at import (``shared.models_path``, ``sd_models.model_path``, ``sd_vae.vae_path``), creating
``models/Stable-diffusion`` as the real ``sd_models.setup_model()`` does.
"""

# ruff: noqa: PTH100, PTH103, PTH118

from __future__ import annotations

import os
import sys

from modules import paths_internal

cwd = paths_internal.cwd
script_path = paths_internal.script_path
data_path = paths_internal.data_path
models_path = paths_internal.models_path
extensions_dir = paths_internal.extensions_dir
extensions_builtin_dir = paths_internal.extensions_builtin_dir
sd_path = script_path
paths: dict[str, str] = {}

_EXPORTED = ("script_path", "data_path", "models_path", "extensions_dir", "extensions_builtin_dir")


def configure(root: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> str:
    """Fake only: put the fake WebUI's folders under ``root``; returns the new ``models_path``."""
    global script_path, data_path, models_path, extensions_dir, extensions_builtin_dir, sd_path

    paths_internal._set(root, models_dir)
    script_path = sd_path = paths_internal.script_path
    data_path = paths_internal.data_path
    models_path = paths_internal.models_path
    extensions_dir = paths_internal.extensions_dir
    extensions_builtin_dir = paths_internal.extensions_builtin_dir

    shared = sys.modules.get("modules.shared")
    if shared is not None:
        for name in (*_EXPORTED, "sd_configs_path", "sd_default_config", "sd_model_file", "default_sd_model_file"):
            setattr(shared, name, getattr(paths_internal, name))
        shared.cmd_opts.data_dir = data_path
        shared.cmd_opts.ckpt = paths_internal.sd_model_file
    sd_models = sys.modules.get("modules.sd_models")
    if sd_models is not None:
        sd_models.model_path = os.path.abspath(os.path.join(models_path, sd_models.model_dir))
    sd_vae = sys.modules.get("modules.sd_vae")
    if sd_vae is not None:
        sd_vae.vae_path = os.path.abspath(os.path.join(models_path, "VAE"))
    os.makedirs(os.path.join(models_path, "Stable-diffusion"), exist_ok=True)
    return models_path


os.makedirs(os.path.join(models_path, "Stable-diffusion"), exist_ok=True)
