"""Mirrors the weight-patching part of the built-in Lora extension's ``networks.py`` (WebUI v1.10.1,
``extensions-builtin/Lora/networks.py``); in the WebUI it is importable as ``networks`` (``sys.modules["networks"]``)
once the Lora extension's scripts have loaded.

Real: ``network_apply_weights(module)`` runs inside the patched ``forward`` of Linear/Conv2d/GroupNorm/LayerNorm/
MultiheadAttention; the first time networks are active it stores ``module.network_weights_backup`` /
``module.network_bias_backup`` (CPU copies, bias backup None when the layer has no bias), then adds the deltas to
``weight``/``bias`` **in place** and sets ``module.network_current_names`` to a tuple of
``(name, te_multiplier, unet_multiplier, dyn_dim)``. The weights stay patched after the generation.

Mirrored as in the real file: ``loaded_networks``, ``store_weights_backup``, ``restore_weights_backup``,
``network_restore_weights_from_backup``, ``network_reset_cached_weight``; the list of files
(``available_networks``, ``available_network_aliases``, ``forbidden_network_aliases``, ``list_available_networks()``:
every ``.pt/.ckpt/.safetensors`` under ``cmd_opts.lora_dir``, named by stem, aliased by the ``ss_output_name``
metadata; ``NetworkOnDisk`` keeps ``name``, ``filename``, ``metadata``, ``alias``; the real one also reads hashes and
the version). Fake only (the real deltas come from forward passes with a Lora in the prompt):
``apply_test_deltas(sd_model, ...)`` patches weights the same way, and ``reset()``. MultiheadAttention's tuple
backups are not simulated.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import torch
from modules import devices, fake, shared

loaded_networks: list[Any] = []
available_networks: dict[str, Any] = {}
available_network_aliases: dict[str, Any] = {}
forbidden_network_aliases: dict[str, int] = {}


def _metadata(filename: str) -> dict[str, str]:
    if not filename.lower().endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    with safe_open(filename, framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})


def list_available_networks() -> None:
    """Real (L679-688 with process_network_files L651-672): clear, then scan ``--lora-dir``."""
    fake.record("networks.list_available_networks")
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)  # noqa: PTH103  (as the real one)
    for folder, _, files in os.walk(shared.cmd_opts.lora_dir, followlinks=True):
        for file in sorted(files):
            filename = os.path.join(folder, file)  # noqa: PTH118
            name, extension = os.path.splitext(file)  # noqa: PTH122
            if extension.lower() not in (".pt", ".ckpt", ".safetensors"):
                continue
            metadata = _metadata(filename)
            entry = SimpleNamespace(
                name=name, filename=filename, metadata=metadata, alias=metadata.get("ss_output_name", name)
            )
            available_networks[name] = entry
            if entry.alias in available_network_aliases:
                forbidden_network_aliases[entry.alias.lower()] = 1
            available_network_aliases[name] = entry
            available_network_aliases[entry.alias] = entry


def store_weights_backup(weight: torch.Tensor | None) -> torch.Tensor | None:
    if weight is None:
        return None
    return weight.to(devices.cpu, copy=True)


def restore_weights_backup(obj: torch.nn.Module, field: str, weight: torch.Tensor | None) -> None:
    if weight is None:
        setattr(obj, field, None)
        return
    getattr(obj, field).copy_(weight)


def network_restore_weights_from_backup(self: torch.nn.Module) -> None:
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)

    if weights_backup is None and bias_backup is None:
        return

    fake.record("networks.network_restore_weights_from_backup")
    with torch.no_grad():
        if weights_backup is not None:
            if isinstance(self, torch.nn.MultiheadAttention):
                restore_weights_backup(self, "in_proj_weight", weights_backup[0])
                restore_weights_backup(self.out_proj, "weight", weights_backup[1])
            else:
                restore_weights_backup(self, "weight", weights_backup)

        if isinstance(self, torch.nn.MultiheadAttention):
            restore_weights_backup(self.out_proj, "bias", bias_backup)
        else:
            restore_weights_backup(self, "bias", bias_backup)


def network_reset_cached_weight(self: torch.nn.Module) -> None:
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


def apply_test_deltas(
    sd_model: torch.nn.Module,
    name: str = "test_lora",
    delta: float = 0.01,
    prefixes: tuple[str, ...] = ("model.diffusion_model.", "cond_stage_model."),
    limit: int | None = None,
) -> list[str]:
    """Fake only: patch every module under ``prefixes`` that looks like a Linear/Conv2d (a 2-D or 4-D ``weight``, not
    an embedding) the way ``network_apply_weights`` leaves it after a generation with a Lora: backups stored,
    ``delta`` added in place, ``network_current_names`` set. Returns the patched module names (at most ``limit``)."""
    wanted = ((name, 1.0, 1.0, None),)
    patched: list[str] = []
    for module_name, module in sd_model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or weight.ndim not in (2, 4) or "embedding" in module_name.lower():
            continue
        if not (module_name + ".").startswith(prefixes):
            continue
        if limit is not None and len(patched) >= limit:
            break
        if getattr(module, "network_weights_backup", None) is None:
            module.network_weights_backup = store_weights_backup(weight)
            module.network_bias_backup = store_weights_backup(module._parameters.get("bias"))
        with torch.no_grad():
            weight.copy_((weight.float() + delta).to(weight.dtype))
        module.network_current_names = wanted
        patched.append(module_name)
    fake.record("networks.apply_test_deltas", network=name, count=len(patched))
    return patched


def reset() -> None:
    loaded_networks.clear()
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
