"""Mirrors ``modules/shared.py`` (v1.10.1) with what ``shared_init.initialize()`` fills in.

- ``cmd_opts``: an ``argparse.Namespace`` with the real flags' defaults (``ckpt_dir=None``, ``api_auth=None``,
  ``lora_dir`` = ``models/Lora`` as the Lora extension's preload sets it,
  ``data_dir`` = the fake root, ...), plus the derived ``webui_is_non_local`` / ``disable_extension_access``.
  ``reset_cmd_opts(**changes)`` (fake only) sets them in place and recomputes the derived ones.
- ``opts``: a real-algorithm ``options.Options`` over the subset of the WebUI's options that model loading, VAE,
  previews and interrupts read (same keys and defaults). As in ``initialize_util.configure_opts_onchange``,
  ``sd_model_checkpoint`` and ``fp8_storage`` reload the model through ``wrap_queued_call`` (so they take
  ``queue_lock``), ``cache_fp16_weight`` with ``forced_reload=True``, ``sd_vae`` reloads the VAE.
- ``state``: a ``shared_state.State``.
- ``sd_model``: a property of this module, as in the real WebUI (``shared_items.Shared``): reading it calls
  ``sd_models.model_data.get_sd_model()`` (which loads a model the first time), assigning it calls ``set_sd_model``.
- ``device`` is ``devices.device`` (a property here, so ``devices.reset()`` is seen).
- ``interrogator``: an ``interrogate.InterrogateModels("interrogate")`` as ``shared_init.initialize()`` makes it
  (nothing loaded); the ``interrogate_*`` / ``deepbooru_*`` options have the real keys and defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
import types
from typing import Any

from modules import devices, options, paths_internal, shared_state
from modules.paths_internal import (  # noqa: F401
    data_path,
    default_sd_model_file,
    extensions_builtin_dir,
    extensions_dir,
    models_path,
    script_path,
    sd_configs_path,
    sd_default_config,
    sd_model_file,
)

OptionInfo = options.OptionInfo
options_section = options.options_section


def _default_cmd_opts() -> dict[str, Any]:
    """The real parser's defaults for the flags an extension or the model code reads."""
    return {
        "data_dir": paths_internal.data_path,
        "models_dir": None,
        "config": paths_internal.sd_default_config,
        "ckpt": paths_internal.sd_model_file,
        "ckpt_dir": None,
        # added by the built-in Lora extension's preload.py (extensions-builtin/Lora/preload.py), so always set
        "lora_dir": os.path.join(paths_internal.models_path, "Lora"),  # noqa: PTH118
        "vae_dir": None,
        "vae_path": None,
        "no_half": False,
        "no_half_vae": False,
        "precision": "autocast",
        "upcast_sampling": False,
        "lowvram": False,
        "medvram": False,
        "medvram_sdxl": False,
        "lowram": False,
        "use_cpu": [],
        "device_id": None,
        "opt_channelslast": False,
        "no_hashing": False,
        "no_download_sd_model": False,
        "disable_safe_unpickle": False,
        "skip_load_model_at_start": False,
        "do_not_download_clip": False,
        "api": False,
        "api_auth": None,
        "api_log": False,
        "api_server_stop": False,
        "nowebui": False,
        "listen": False,
        "share": False,
        "ngrok": None,
        "server_name": None,
        "port": None,
        "subpath": None,
        "gradio_auth": None,
        "gradio_auth_path": None,
        "enable_insecure_extension_access": False,
        "freeze_settings": False,
        "hide_ui_dir_config": False,
        "skip_install": False,
        "ui_settings_file": os.path.join(paths_internal.data_path, "config.json"),  # noqa: PTH118
        "ui_config_file": os.path.join(paths_internal.data_path, "ui-config.json"),  # noqa: PTH118
    }


def _derive(ns: argparse.Namespace) -> None:
    """Real (``shared_cmd_options.py``): the two flags computed after parsing."""
    ns.webui_is_non_local = any([ns.share, ns.listen, ns.ngrok, ns.server_name])
    ns.disable_extension_access = ns.webui_is_non_local and not ns.enable_insecure_extension_access


cmd_opts = argparse.Namespace(**_default_cmd_opts())
_derive(cmd_opts)


def reset_cmd_opts(**changes: Any) -> argparse.Namespace:
    """Fake only: defaults updated with ``changes`` (e.g. ``ckpt_dir=..., api_auth="u:p", listen=True``), in place."""
    unknown = set(changes) - set(_default_cmd_opts())
    if unknown:
        raise TypeError(f"fake cmd_opts has no flag(s) {sorted(unknown)}")
    cmd_opts.__dict__.clear()
    cmd_opts.__dict__.update(_default_cmd_opts())
    cmd_opts.__dict__.update(changes)
    _derive(cmd_opts)
    return cmd_opts


def _reload_model() -> None:
    from modules import sd_models

    sd_models.reload_model_weights()


def _reload_model_forced() -> None:
    from modules import sd_models

    sd_models.reload_model_weights(forced_reload=True)


def _reload_vae() -> None:
    from modules import sd_vae

    sd_vae.reload_vae_weights()


def _options_templates() -> dict[str, OptionInfo]:
    from modules.call_queue import wrap_queued_call

    def opt(default: Any, label: str, onchange: Any = None, **kw: Any) -> OptionInfo:
        return OptionInfo(default, label, onchange=onchange, **kw)

    return {
        "sd_model_checkpoint": opt(None, "Stable Diffusion checkpoint", wrap_queued_call(_reload_model)),
        "sd_checkpoints_limit": opt(1, "Maximum number of checkpoints loaded at the same time"),
        "sd_checkpoints_keep_in_cpu": opt(True, "Only keep one model on device"),
        "sd_checkpoint_cache": opt(0, "Checkpoints to cache in RAM"),
        "sd_checkpoint_hash": opt("", "SHA256 hash of the current checkpoint"),
        "sd_vae_checkpoint_cache": opt(0, "VAE Checkpoints to cache in RAM"),
        "sd_vae": opt("Automatic", "SD VAE", wrap_queued_call(_reload_vae)),
        "sd_vae_overrides_per_model_preferences": opt(
            True, "Selected VAE overrides per-model preferences", wrap_queued_call(_reload_vae)
        ),
        "fp8_storage": opt("Disable", "FP8 weight", wrap_queued_call(_reload_model)),
        "cache_fp16_weight": opt(False, "Cache FP16 weight for LoRA", wrap_queued_call(_reload_model_forced)),
        "unload_models_when_training": opt(False, "Move VAE and CLIP to RAM when training if possible. Saves VRAM."),
        "disable_mmap_load_safetensors": opt(False, "Disable memmapping for loading .safetensors files."),
        "list_hidden_files": opt(True, "Load models/files in hidden directories"),
        "sd_checkpoint_dropdown_use_short": opt(False, "Checkpoint dropdown: use filenames without paths"),
        "live_previews_enable": opt(True, "Show live previews of the created image"),
        "live_previews_image_format": opt("png", "Live preview file format"),
        "show_progress_every_n_steps": opt(10, "Live preview display period"),
        "show_progress_grid": opt(True, "Show previews of all images generated in a batch as a grid"),
        "interrupt_after_current": opt(True, "Don't Interrupt in the middle"),
        "hidden_tabs": opt([], "Hidden UI tabs"),
        "ui_tab_order": opt([], "UI tab order"),
        "lora_functional": opt(False, "Lora/Networks: use old method that takes longer when you have multiple Loras"),
        "interrogate_keep_models_in_memory": opt(False, "Keep models in VRAM"),
        "interrogate_return_ranks": opt(False, "Include ranks of model tags matches in results."),
        "interrogate_clip_num_beams": opt(1, "BLIP: num_beams"),
        "interrogate_clip_min_length": opt(24, "BLIP: minimum description length"),
        "interrogate_clip_max_length": opt(48, "BLIP: maximum description length"),
        "interrogate_clip_dict_limit": opt(1500, "CLIP: maximum number of lines in text file"),
        "interrogate_clip_skip_categories": opt([], "CLIP: skip inquire categories"),
        "interrogate_deepbooru_score_threshold": opt(0.5, "deepbooru: score threshold"),
        "deepbooru_sort_alpha": opt(True, "deepbooru: sort tags alphabetically"),
        "deepbooru_use_spaces": opt(True, "deepbooru: use spaces in tags"),
        "deepbooru_escape": opt(True, "deepbooru: escape (\\) brackets"),
        "deepbooru_filter_tags": opt("", "deepbooru: filter out those tags"),
    }


opts = options.Options(_options_templates(), restricted_opts=set())
restricted_opts: set[str] = set()
state = shared_state.State()
demo = None
weight_load_location: str | None = "cpu"  # real: None with --lowram, else "cpu"
parallel_processing_allowed = True
hf_endpoint = os.getenv("HF_ENDPOINT", "https://huggingface.co")
settings_components: dict[str, Any] | None = None
tab_names: list[str] = []


class Shared(types.ModuleType):
    """Real (``shared_items.Shared``): ``sd_model`` is a property of the ``modules.shared`` module."""

    @property
    def sd_model(self) -> Any:
        from modules import sd_models

        return sd_models.model_data.get_sd_model()

    @sd_model.setter
    def sd_model(self, value: Any) -> None:
        from modules import sd_models

        sd_models.model_data.set_sd_model(value)

    @property
    def device(self) -> Any:
        return devices.device

    @device.setter
    def device(self, value: Any) -> None:
        devices.device = value


sys.modules[__name__].__class__ = Shared


def _make_interrogator() -> Any:
    """Real (``shared_init.initialize``): ``shared.interrogator = interrogate.InterrogateModels("interrogate")``."""
    from modules import interrogate

    return interrogate.InterrogateModels("interrogate")


interrogator = _make_interrogator()  # real: None until shared_init.initialize() sets it
