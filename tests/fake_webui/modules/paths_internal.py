"""Mirrors ``modules/paths_internal.py`` (v1.10.1): the WebUI's folders as plain strings.

Real: ``script_path`` is the WebUI install folder, ``data_path`` is ``--data-dir`` (default: the install folder),
``models_path`` is ``--models-dir`` or ``data_path/models``. Fake: everything lives under one root: the environment
variable ``FAKE_WEBUI_DATA_DIR`` if set, else a fresh temporary folder; ``modules.paths.configure(root)`` moves it.
"""

# Mirrors the real module, which works with os.path strings:
# ruff: noqa: PTH100, PTH109, PTH118

from __future__ import annotations

import os
import tempfile

ROOT_ENV = "FAKE_WEBUI_DATA_DIR"

cwd = os.getcwd()
script_path = ""
data_path = ""
models_path = ""
sd_configs_path = ""
sd_default_config = ""
sd_model_file = ""
default_sd_model_file = ""
extensions_dir = ""
extensions_builtin_dir = ""
config_states_dir = ""
default_output_dir = ""


def _set(root: str | os.PathLike, models_dir: str | os.PathLike | None = None) -> None:
    """Fake only: point every path at ``root`` (``models_dir`` plays ``--models-dir``)."""
    global script_path, data_path, models_path, sd_configs_path, sd_default_config, sd_model_file
    global default_sd_model_file, extensions_dir, extensions_builtin_dir, config_states_dir, default_output_dir

    root = os.path.abspath(root)
    script_path = root
    data_path = root
    models_path = os.path.abspath(models_dir) if models_dir else os.path.join(data_path, "models")
    sd_configs_path = os.path.join(script_path, "configs")
    sd_default_config = os.path.join(sd_configs_path, "v1-inference.yaml")
    sd_model_file = os.path.join(script_path, "model.ckpt")
    default_sd_model_file = sd_model_file
    extensions_dir = os.path.join(data_path, "extensions")
    extensions_builtin_dir = os.path.join(script_path, "extensions-builtin")
    config_states_dir = os.path.join(script_path, "config_states")
    default_output_dir = os.path.join(data_path, "outputs")


_set(os.environ.get(ROOT_ENV) or tempfile.mkdtemp(prefix="fake-webui-"))
