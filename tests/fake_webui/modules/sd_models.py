"""Mirrors ``modules/sd_models.py`` (v1.10.1): the checkpoint list and the loaded model.

Same names, signatures and control flow for ``CheckpointInfo`` (fields, title format, re-titling by
``calculate_shorthash``), ``checkpoints_list`` (keyed by title), ``checkpoint_aliases``, ``list_models``,
``get_closet_checkpoint_match``, ``select_checkpoint`` (with its silent fallback), ``load_model``,
``load_model_weights`` (fp16/fp32/fp8 casting as the real one), ``reload_model_weights`` (including its early return
that leaves a CPU-unloaded model on the CPU), ``reuse_model_from_already_loaded``, ``unload_model_weights``,
``send_model_to_cpu`` / ``send_model_to_device`` / ``send_model_to_trash``, ``model_data`` and ``check_fp8``.

The model is ``FakeSdModel``: a ``torch.nn.Module`` whose module tree is built from the checkpoint's keys (one plain
sub-module per key prefix, tensors as parameters), plus the DDPM schedule buffers the real ``LatentDiffusion`` always
has (SDXL: sgm's ``denoiser.sigmas`` instead).  So ``state_dict()`` has the file's keys (after the real SD1 key
normalisation), the hijack's ``.wrapped`` segments (see ``sd_hijack``), the schedule buffers, and the dtypes the
WebUI would give them.

Where the model is: ``model.location`` is ``"cuda"`` (on the accelerator), ``"cpu"`` or ``"meta"`` (trashed), updated
by every ``.to()``/``.cpu()``/``.cuda()``. On a machine without CUDA the accelerator is simulated: ``devices.device``
is a CPU device object distinct from ``devices.cpu`` and a move to it (or to ``"cuda"``) sets ``location = "cuda"``
without moving tensors. Every function here is recorded in ``fake.calls`` (``sd_models.<name>``, ``model.to``).

Simplifications: no config yaml is read (``used_config`` is the sidecar yaml's path or the name of the config the real
``guess_model_config_from_state_dict`` would pick; SD2 is always taken as v-prediction because the fake cannot run
the UNet test); the sha256 cache is in memory (``sha256_cache``); no lowvram hooks (``model.lowvram`` is still set
from ``--lowvram/--medvram`` and honoured by the send functions); no textual-inversion reload.
Fake-only: ``faults`` (make a file unreadable or make switches do nothing), ``reset()``, ``calls``.
"""

# Mirrors the real module, which works with os.path strings:
# ruff: noqa: PTH100, PTH103, PTH110, PTH114, PTH118, PTH119, PTH122, PTH204

from __future__ import annotations

import collections
import contextlib
import enum
import hashlib
import json
import os
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import safetensors.torch
import torch

from modules import devices, fake, paths, script_callbacks, sd_hijack, shared

model_dir = "Stable-diffusion"
model_path = os.path.abspath(os.path.join(paths.models_path, model_dir))

checkpoints_list: dict[str, CheckpointInfo] = {}
checkpoint_aliases: dict[str, CheckpointInfo] = {}
checkpoint_alisases = checkpoint_aliases  # for compatibility with old name
checkpoints_loaded: collections.OrderedDict[CheckpointInfo, dict[str, torch.Tensor]] = collections.OrderedDict()

calls = fake.calls
"""The shared fake call log (same list as ``modules.fake.calls``)."""

sha256_cache: dict[str, dict[str, Any]] = {}
"""Fake of the real ``cache.json`` "hashes" section: ``"checkpoint/<name>" -> {"mtime": ..., "sha256": ...}``."""


@dataclass
class Faults:
    """Fake only: failures a test can switch on."""

    unreadable: set[str] = field(default_factory=set)
    """Absolute filenames whose reading raises ``OSError`` (a damaged or vanished file)."""
    ignore_switch: bool = False
    """``reload_model_weights`` returns the current model and does nothing (a switch that silently did not happen)."""


faults = Faults()


class ModelType(enum.Enum):
    SD1 = 1
    SD2 = 2
    SDXL = 3
    SSD = 4
    SD3 = 5


def replace_key(d: dict[str, Any], key: str, new_key: str, value: Any) -> dict[str, Any]:
    keys = list(d.keys())
    d[new_key] = value
    if key not in keys:
        return d
    index = keys.index(key)
    keys[index] = new_key
    new_d = {k: d[k] for k in keys}
    d.clear()
    d.update(new_d)
    return d


def _sha256_from_cache(filename: str, title: str) -> str | None:
    """Real: ``hashes.sha256_from_cache`` (cached value, valid if the file is not newer)."""
    try:
        ondisk_mtime = os.path.getmtime(filename)
    except FileNotFoundError:
        return None
    entry = sha256_cache.get(title)
    if entry is None or entry.get("sha256") is None or ondisk_mtime > entry.get("mtime", 0):
        return None
    return entry["sha256"]


def _sha256(filename: str, title: str) -> str | None:
    """Real: ``hashes.sha256`` (cached, else computed and cached; None with ``--no-hashing``)."""
    value = _sha256_from_cache(filename, title)
    if value is not None:
        return value
    if shared.cmd_opts.no_hashing:
        return None
    digest = hashlib.sha256()
    with open(filename, "rb") as file:
        for chunk in iter(lambda: file.read(1024 * 1024), b""):
            digest.update(chunk)
    sha256_cache[title] = {"mtime": os.path.getmtime(filename), "sha256": digest.hexdigest()}
    return digest.hexdigest()


class CheckpointInfo:
    def __init__(self, filename: str):
        self.filename = filename
        abspath = os.path.abspath(filename)
        abs_ckpt_dir = os.path.abspath(shared.cmd_opts.ckpt_dir) if shared.cmd_opts.ckpt_dir is not None else None

        self.is_safetensors = os.path.splitext(filename)[1].lower() == ".safetensors"

        if abs_ckpt_dir and abspath.startswith(abs_ckpt_dir):
            name = abspath.replace(abs_ckpt_dir, "")
        elif abspath.startswith(model_path):
            name = abspath.replace(model_path, "")
        else:
            name = os.path.basename(filename)

        if name.startswith(("\\", "/")):
            name = name[1:]

        self.metadata: dict[str, Any] = {}
        if self.is_safetensors:
            try:
                self.metadata = read_metadata_from_safetensors(filename)
                self.modelspec_thumbnail = self.metadata.pop("modelspec.thumbnail", None)
            except Exception as e:
                from modules import errors

                errors.display(e, f"reading metadata for {filename}")

        self.name = name
        self.name_for_extra = os.path.splitext(os.path.basename(filename))[0]
        self.model_name = os.path.splitext(name.replace("/", "_").replace("\\", "_"))[0]
        self.hash = model_hash(filename)

        self.sha256 = _sha256_from_cache(self.filename, f"checkpoint/{name}")
        self.shorthash = self.sha256[0:10] if self.sha256 else None

        self.title = name if self.shorthash is None else f"{name} [{self.shorthash}]"
        self.short_title = (
            self.name_for_extra if self.shorthash is None else f"{self.name_for_extra} [{self.shorthash}]"
        )

        self.ids = [self.hash, self.model_name, self.title, name, self.name_for_extra, f"{name} [{self.hash}]"]
        if self.shorthash:
            self.ids += [
                self.shorthash,
                self.sha256,
                f"{self.name} [{self.shorthash}]",
                f"{self.name_for_extra} [{self.shorthash}]",
            ]

    def register(self) -> None:
        checkpoints_list[self.title] = self
        for id_ in self.ids:
            checkpoint_aliases[id_] = self

    def calculate_shorthash(self) -> str | None:
        self.sha256 = _sha256(self.filename, f"checkpoint/{self.name}")
        if self.sha256 is None:
            return None

        shorthash = self.sha256[0:10]
        if self.shorthash == self.sha256[0:10]:
            return self.shorthash

        self.shorthash = shorthash

        if self.shorthash not in self.ids:
            self.ids += [
                self.shorthash,
                self.sha256,
                f"{self.name} [{self.shorthash}]",
                f"{self.name_for_extra} [{self.shorthash}]",
            ]

        old_title = self.title
        self.title = f"{self.name} [{self.shorthash}]"
        self.short_title = f"{self.name_for_extra} [{self.shorthash}]"

        replace_key(checkpoints_list, old_title, self.title, self)
        self.register()

        return self.shorthash

    def __repr__(self) -> str:
        return f"CheckpointInfo({self.title!r})"


def setup_model() -> None:
    os.makedirs(model_path, exist_ok=True)


def checkpoint_tiles(use_short: bool = False) -> list[str]:
    return [x.short_title if use_short else x.title for x in checkpoints_list.values()]


def _natural_sort_key(s: str, regex: re.Pattern[str] = re.compile(r"([0-9]+)")) -> list[Any]:
    return [int(text) if text.isdigit() else text.lower() for text in regex.split(s)]


def _walk_files(path: str, allowed_extensions: list[str] | None = None) -> Iterator[str]:
    """Real: ``util.walk_files``."""
    if not os.path.exists(path):
        return
    allowed = set(allowed_extensions) if allowed_extensions is not None else None
    items = sorted(os.walk(path, followlinks=True), key=lambda x: _natural_sort_key(x[0]))
    for root, _, files in items:
        for filename in sorted(files, key=_natural_sort_key):
            if allowed is not None and os.path.splitext(filename)[1].lower() not in allowed:
                continue
            if not shared.opts.list_hidden_files and ("/." in root or "\\." in root):
                continue
            yield os.path.join(root, filename)


def _load_models(
    model_path: str, command_path: str | None, ext_filter: list[str], ext_blacklist: list[str]
) -> list[str]:
    """Real: ``modelloader.load_models`` without the download of SD 1.5 when nothing is found."""
    output: list[str] = []
    places = []
    if command_path is not None and command_path != model_path:
        pretrained_path = os.path.join(command_path, "experiments/pretrained_models")
        if os.path.exists(pretrained_path):
            places.append(pretrained_path)
        elif os.path.exists(command_path):
            places.append(command_path)
    places.append(model_path)
    for place in places:
        for full_path in _walk_files(place, allowed_extensions=ext_filter):
            if os.path.islink(full_path) and not os.path.exists(full_path):
                continue
            if any(full_path.endswith(x) for x in ext_blacklist):
                continue
            if full_path not in output:
                output.append(full_path)
    return output


def list_models() -> None:
    fake.record("sd_models.list_models")
    checkpoints_list.clear()
    checkpoint_aliases.clear()

    cmd_ckpt = shared.cmd_opts.ckpt
    model_list = _load_models(
        model_path=model_path,
        command_path=shared.cmd_opts.ckpt_dir,
        ext_filter=[".ckpt", ".safetensors"],
        ext_blacklist=[".vae.ckpt", ".vae.safetensors"],
    )

    if cmd_ckpt is not None and os.path.exists(cmd_ckpt):
        checkpoint_info = CheckpointInfo(cmd_ckpt)
        checkpoint_info.register()
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title
    elif cmd_ckpt is not None and cmd_ckpt != shared.default_sd_model_file:
        print(
            f"Checkpoint in --ckpt argument not found (Possible it was moved to {model_path}: {cmd_ckpt}",
            file=sys.stderr,
        )

    for filename in model_list:
        CheckpointInfo(filename).register()


re_strip_checksum = re.compile(r"\s*\[[^]]+]\s*$")


def get_closet_checkpoint_match(search_string: str | None) -> CheckpointInfo | None:
    if not search_string:
        return None

    checkpoint_info = checkpoint_aliases.get(search_string)
    if checkpoint_info is not None:
        return checkpoint_info

    found = sorted([i for i in checkpoints_list.values() if search_string in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]

    without_checksum = re.sub(re_strip_checksum, "", search_string)
    found = sorted([i for i in checkpoints_list.values() if without_checksum in i.title], key=lambda x: len(x.title))
    if found:
        return found[0]

    return None


def model_hash(filename: str) -> str:
    """old hash that only looks at a small part of the file and is prone to collisions"""
    try:
        with open(filename, "rb") as file:
            m = hashlib.sha256()
            file.seek(0x100000)
            m.update(file.read(0x10000))
            return m.hexdigest()[0:8]
    except FileNotFoundError:
        return "NOFILE"


def select_checkpoint() -> CheckpointInfo:
    """Raises `FileNotFoundError` if no checkpoints are found."""
    model_checkpoint = shared.opts.sd_model_checkpoint

    checkpoint_info = checkpoint_aliases.get(model_checkpoint)
    if checkpoint_info is not None:
        return checkpoint_info

    if len(checkpoints_list) == 0:
        raise FileNotFoundError(
            f"No checkpoints found. When searching for checkpoints, looked at:\n - directory {model_path}"
            + (f"\n - directory {os.path.abspath(shared.cmd_opts.ckpt_dir)}" if shared.cmd_opts.ckpt_dir else "")
            + "Can't run without a checkpoint. Find and place a .ckpt or .safetensors file into any of those locations."
        )

    checkpoint_info = next(iter(checkpoints_list.values()))
    if model_checkpoint is not None:
        fake.record("sd_models.select_checkpoint.fallback", wanted=model_checkpoint, using=checkpoint_info.title)
        print(f"Checkpoint {model_checkpoint} not found; loading fallback {checkpoint_info.title}", file=sys.stderr)

    return checkpoint_info


checkpoint_dict_replacements_sd1 = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}

checkpoint_dict_replacements_sd2_turbo = {"conditioner.embedders.0.": "cond_stage_model."}


def transform_checkpoint_dict_key(k: str, replacements: dict[str, str]) -> str:
    for text, replacement in replacements.items():
        if k.startswith(text):
            k = replacement + k[len(text) :]
    return k


def get_state_dict_from_checkpoint(pl_sd: dict[str, Any]) -> dict[str, Any]:
    pl_sd = pl_sd.pop("state_dict", pl_sd)
    pl_sd.pop("state_dict", None)

    turbo_key = "conditioner.embedders.0.model.ln_final.weight"
    is_sd2_turbo = turbo_key in pl_sd and pl_sd[turbo_key].size()[0] == 1024

    sd = {}
    for k, v in pl_sd.items():
        replacements = checkpoint_dict_replacements_sd2_turbo if is_sd2_turbo else checkpoint_dict_replacements_sd1
        new_key = transform_checkpoint_dict_key(k, replacements)
        if new_key is not None:
            sd[new_key] = v

    pl_sd.clear()
    pl_sd.update(sd)
    return pl_sd


def read_metadata_from_safetensors(filename: str) -> dict[str, Any]:
    with open(filename, mode="rb") as file:
        metadata_len = int.from_bytes(file.read(8), "little")
        json_start = file.read(2)
        assert metadata_len > 2 and json_start in (b'{"', b"{'"), f"{filename} is not a safetensors file"
        res: dict[str, Any] = {}
        json_obj = json.loads(json_start + file.read(metadata_len - 2))
        for k, v in json_obj.get("__metadata__", {}).items():
            res[k] = v
            if isinstance(v, str) and v[0:1] == "{":
                with contextlib.suppress(Exception):
                    res[k] = json.loads(v)
        return res


def read_state_dict(checkpoint_file: str, print_global_state: bool = False, map_location: Any = None) -> dict[str, Any]:
    """Real: safetensors via ``safetensors.torch.load_file`` (to ``map_location or shared.weight_load_location``),
    anything else via ``torch.load`` -- which in the WebUI is ``modules.safe.load`` (returns None on a refused file,
    and then this function fails on ``None.pop``)."""
    fake.record("sd_models.read_state_dict", filename=checkpoint_file)
    if os.path.abspath(checkpoint_file) in faults.unreadable:
        raise OSError(f"fake: cannot read {checkpoint_file}")
    _, extension = os.path.splitext(checkpoint_file)
    if extension.lower() == ".safetensors":
        device = map_location or shared.weight_load_location or devices.get_optimal_device_name()
        pl_sd = safetensors.torch.load_file(checkpoint_file, device=device)
    else:
        from modules import safe

        pl_sd = safe.load(checkpoint_file, map_location=map_location or shared.weight_load_location)

    if print_global_state and "global_step" in pl_sd:
        print(f"Global Step: {pl_sd['global_step']}")

    return get_state_dict_from_checkpoint(pl_sd)


def get_checkpoint_state_dict(checkpoint_info: CheckpointInfo, timer: Any = None) -> dict[str, Any]:
    checkpoint_info.calculate_shorthash()
    if checkpoint_info in checkpoints_loaded:
        checkpoints_loaded.move_to_end(checkpoint_info)
        return checkpoints_loaded[checkpoint_info]
    return read_state_dict(checkpoint_info.filename)


class SkipWritingToConfig:
    """This context manager prevents load_model_weights from writing checkpoint name to the config when it loads
    weight."""

    skip = False
    previous = None

    def __enter__(self) -> SkipWritingToConfig:
        self.previous = SkipWritingToConfig.skip
        SkipWritingToConfig.skip = True
        return self

    def __exit__(self, exc_type: object, exc_value: object, exc_traceback: object) -> None:
        SkipWritingToConfig.skip = self.previous


def check_fp8(model: Any) -> bool | None:
    if model is None:
        return None
    if devices.get_optimal_device_name() == "mps":
        return False
    if shared.opts.fp8_storage == "Enable":
        return True
    return bool(getattr(model, "is_sdxl", False) and shared.opts.fp8_storage == "Enable for SDXL")


# ------------------------------------------------------------------------------------------- the fake model


class _Node(torch.nn.Module):
    """Stands in for any ldm / transformers / open_clip sub-module: holds the tensors of one key prefix."""


def _is_linear_or_conv(name: str, module: torch.nn.Module) -> bool:
    """Fake's guess of which sub-modules are ``nn.Linear``/``nn.Conv2d`` (the ones the real fp8 mode casts): a 2-D or
    4-D ``weight`` parameter, not an embedding table."""
    weight = module._parameters.get("weight")
    return weight is not None and weight.ndim in (2, 4) and "embedding" not in name.lower()


def _ddpm_schedule(timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012) -> dict[str, Any]:
    """The buffers ``ldm.models.diffusion.ddpm.DDPM.register_schedule`` creates (SD's scaled-linear schedule)."""
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    values = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {k: v.to(torch.float32) for k, v in values.items()}


class FakeSdModel(torch.nn.Module):
    """Stands in for the WebUI's ``LatentDiffusion`` (``shared.sd_model``); see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.location = "cpu"
        self.lowvram = False
        self.sd_model_hash: str | None = None
        self.sd_model_checkpoint: str | None = None
        self.sd_checkpoint_info: CheckpointInfo | None = None
        self.is_sd1 = self.is_sd2 = self.is_sdxl = self.is_ssd = self.is_sd3 = False
        self.is_sdxl_inpaint = False
        self.model_type: ModelType | None = None
        self.latent_channels = 4
        self.used_config: str | None = None
        self.base_vae: dict[str, Any] | None = None
        self.loaded_vae_file: str | None = None
        self.cond_stage_key = "txt"

    # the tree --------------------------------------------------------------------------------------------------

    def _load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Fake of ``load_state_dict(strict=False)`` into a model built from the config: (re)builds the tree from the
        keys. New sub-modules, so attributes other code hung on the old ones (Lora backups) are gone, as after the
        real load (whose patched ``_load_from_state_dict`` resets them)."""
        for name in list(self._modules):
            delattr(self, name)
        for name in list(self._parameters):
            delattr(self, name)
        for name in list(self._buffers):
            delattr(self, name)

        for key, tensor in state_dict.items():
            if key.startswith("model_ema."):
                continue  # real: use_ema is False, so these keys are not loaded
            *path, leaf = key.split(".")
            module: torch.nn.Module = self
            for part in path:
                child = module._modules.get(part)
                if child is None:
                    child = _Node()
                    module.add_module(part, child)
                module = child
            if path and tensor.is_floating_point():
                module.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=False))
            else:
                module.register_buffer(leaf, tensor)

        schedule = _ddpm_schedule()
        if any(key.startswith("conditioner.") for key in state_dict):
            # sgm's DiffusionEngine (SDXL) has none of ldm's schedule buffers; its DiscreteDenoiser holds the
            # sigmas, in state_dict() as "denoiser.sigmas" though files rarely carry it
            if "denoiser" not in self._modules:
                self.add_module("denoiser", _Node())
            if "sigmas" not in self.denoiser._buffers:
                alphas = schedule["alphas_cumprod"]
                self.denoiser.register_buffer("sigmas", ((1 - alphas) / alphas).sqrt())
            self.alphas_cumprod = schedule["alphas_cumprod"]  # sd_models_xl.extend_sdxl: a plain attribute
            schedule = {}
        for name, value in schedule.items():
            if name not in self._buffers:
                self.register_buffer(name, value)
        # transformers 4.30 (the WebUI's pin) keeps CLIP's position_ids as a persistent buffer
        for key in list(state_dict):
            if key.endswith("text_model.embeddings.position_embedding.weight"):
                owner = dict(self.named_modules()).get(key[: -len(".position_embedding.weight")])
                if owner is not None and "position_ids" not in owner._buffers:
                    owner.register_buffer("position_ids", torch.arange(state_dict[key].shape[0]).unsqueeze(0))

    # where it is --------------------------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Real (LightningModule): the device of the weights. Fake: the real tensors' device (see ``location``)."""
        for tensor in self.parameters():
            return tensor.device
        return torch.device("cpu")

    def to(self, *args: Any, **kwargs: Any) -> FakeSdModel:
        device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args, **kwargs)
        target = args[0] if args else kwargs.get("device")
        simulated = False
        if device is not None:
            if device.type == "meta":
                self.location = "meta"
            elif device.type == "cpu":
                self.location = "cuda" if target is devices.device else "cpu"
            else:
                self.location = "cuda"
                simulated = device.type == "cuda" and not torch.cuda.is_available()
        fake.record("model.to", device=None if device is None else str(device), location=self.location)
        if simulated:
            return super().to(dtype) if dtype is not None else self
        return super().to(*args, **kwargs)

    def cpu(self) -> FakeSdModel:
        return self.to(devices.cpu)

    def cuda(self, device: Any = None) -> FakeSdModel:
        return self.to(torch.device("cuda") if device is None else device)


def set_model_type(model: FakeSdModel, state_dict: dict[str, Any]) -> None:
    model.is_sd1 = model.is_sd2 = model.is_sdxl = model.is_ssd = model.is_sd3 = False
    if "model.diffusion_model.x_embedder.proj.weight" in state_dict:
        model.is_sd3 = True
        model.model_type = ModelType.SD3
    elif any(k.startswith("conditioner.") for k in state_dict):
        model.is_sdxl = True
        if "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight" not in state_dict:
            model.is_ssd = True
            model.model_type = ModelType.SSD
        else:
            model.model_type = ModelType.SDXL
    elif any(k.startswith("cond_stage_model.model.") for k in state_dict):
        model.is_sd2 = True
        model.model_type = ModelType.SD2
    else:
        model.is_sd1 = True
        model.model_type = ModelType.SD1


def set_model_fields(model: FakeSdModel) -> None:
    if not hasattr(model, "latent_channels"):
        model.latent_channels = 4


def find_checkpoint_config(state_dict: dict[str, Any], info: CheckpointInfo | None) -> str:
    """Real (``sd_models_config``): the yaml beside the checkpoint, else a guess from the state dict."""
    if info is not None:
        near = f"{os.path.splitext(info.filename)[0]}.yaml"
        if os.path.exists(near):
            return near
    configs = shared.sd_configs_path
    unet_in = state_dict.get("model.diffusion_model.input_blocks.0.0.weight")
    sd2_proj = state_dict.get("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight")
    if "model.diffusion_model.x_embedder.proj.weight" in state_dict:
        return os.path.join(configs, "sd3-inference.yaml")
    if state_dict.get("conditioner.embedders.1.model.ln_final.weight") is not None:
        name = "sd_xl_inpaint.yaml" if unet_in is not None and unet_in.shape[1] == 9 else "sd_xl_base.yaml"
        return os.path.join(configs, name)
    if state_dict.get("conditioner.embedders.0.model.ln_final.weight") is not None:
        return os.path.join(configs, "sd_xl_refiner.yaml")
    if sd2_proj is not None and sd2_proj.shape[1] == 1024:
        name = (
            "v2-inpainting-inference.yaml" if unet_in is not None and unet_in.shape[1] == 9 else "v2-inference-v.yaml"
        )
        return os.path.join(configs, name)
    if unet_in is not None and unet_in.shape[1] == 9:
        return os.path.join(configs, "v1-inpainting-inference.yaml")
    if unet_in is not None and unet_in.shape[1] == 8:
        return os.path.join(configs, "instruct-pix2pix.yaml")
    return shared.sd_default_config


def load_model_weights(
    model: FakeSdModel, checkpoint_info: CheckpointInfo, state_dict: dict[str, Any] | None, timer: Any = None
) -> None:
    from modules import sd_vae

    fake.record("sd_models.load_model_weights", filename=checkpoint_info.filename)
    sd_model_hash = checkpoint_info.calculate_shorthash()

    if devices.fp8:
        model.half()

    if not SkipWritingToConfig.skip:
        shared.opts.data["sd_model_checkpoint"] = checkpoint_info.title

    if state_dict is None:
        state_dict = get_checkpoint_state_dict(checkpoint_info, timer)

    set_model_type(model, state_dict)
    set_model_fields(model)

    if shared.opts.sd_checkpoint_cache > 0:
        checkpoints_loaded[checkpoint_info] = state_dict.copy()

    model._load_weights(state_dict)
    del state_dict

    unet_in = dict(model.named_parameters()).get("model.diffusion_model.input_blocks.0.0.weight")
    model.is_sdxl_inpaint = model.is_sdxl and unet_in is not None and unet_in.shape[1] == 9

    vae = model._modules.get("first_stage_model")
    if shared.cmd_opts.no_half:
        model.float()
        model.alphas_cumprod_original = model.alphas_cumprod
        devices.dtype_unet = torch.float32
    else:
        # with --no-half-vae, remove VAE from model when doing half() to prevent its weights from being converted
        if shared.cmd_opts.no_half_vae and vae is not None:
            model.first_stage_model = None
        alphas_cumprod = model.alphas_cumprod
        model.alphas_cumprod = None
        model.half()
        model.alphas_cumprod = alphas_cumprod
        model.alphas_cumprod_original = alphas_cumprod
        if vae is not None:
            model.first_stage_model = vae
        devices.dtype_unet = torch.float16

    for module in model.modules():
        for attr in ("fp16_weight", "fp16_bias"):
            if hasattr(module, attr):
                delattr(module, attr)

    if check_fp8(model):
        devices.fp8 = True
        if vae is not None:
            model.first_stage_model = None
        for name, module in model.named_modules():
            if isinstance(module, _Node) and _is_linear_or_conv(name, module):
                if shared.opts.cache_fp16_weight:
                    module.fp16_weight = module.weight.data.clone().cpu().half()
                    if module._parameters.get("bias") is not None:
                        module.fp16_bias = module.bias.data.clone().cpu().half()
                module.to(torch.float8_e4m3fn)
        if vae is not None:
            model.first_stage_model = vae
    else:
        devices.fp8 = False

    if vae is not None:
        vae.to(devices.dtype_vae)

    while len(checkpoints_loaded) > shared.opts.sd_checkpoint_cache:
        checkpoints_loaded.popitem(last=False)

    model.sd_model_hash = sd_model_hash
    model.sd_model_checkpoint = checkpoint_info.filename
    model.sd_checkpoint_info = checkpoint_info
    shared.opts.data["sd_checkpoint_hash"] = checkpoint_info.sha256

    sd_vae.delete_base_vae()
    sd_vae.clear_loaded_vae()
    vae_file, vae_source = sd_vae.resolve_vae(checkpoint_info.filename).tuple()
    sd_vae.load_vae(model, vae_file, vae_source)


class SdModelData:
    def __init__(self) -> None:
        self.sd_model: FakeSdModel | None = None
        self.loaded_sd_models: list[FakeSdModel] = []
        self.was_loaded_at_least_once = False
        self.lock = threading.Lock()

    def get_sd_model(self) -> FakeSdModel | None:
        if self.was_loaded_at_least_once:
            return self.sd_model

        if self.sd_model is None:
            with self.lock:
                if self.sd_model is not None or self.was_loaded_at_least_once:
                    return self.sd_model
                try:
                    load_model()
                except Exception as e:
                    from modules import errors

                    errors.display(e, "loading stable diffusion model", full_traceback=True)
                    print("Stable diffusion model failed to load", file=sys.stderr)
                    self.sd_model = None

        return self.sd_model

    def set_sd_model(self, v: FakeSdModel | None, already_loaded: bool = False) -> None:
        from modules import sd_vae

        self.sd_model = v
        if already_loaded:
            sd_vae.base_vae = getattr(v, "base_vae", None)
            sd_vae.loaded_vae_file = getattr(v, "loaded_vae_file", None)
            sd_vae.checkpoint_info = v.sd_checkpoint_info

        with contextlib.suppress(ValueError):
            self.loaded_sd_models.remove(v)

        if v is not None:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def _lowvram_is_needed(m: Any) -> bool:
    """Real: ``lowvram.is_needed``."""
    c = shared.cmd_opts
    return bool(c.lowvram or c.medvram or (c.medvram_sdxl and getattr(m, "is_sdxl", False)))


def send_model_to_cpu(m: FakeSdModel | None) -> None:
    fake.record("sd_models.send_model_to_cpu", model=m)
    if m is not None:
        if m.lowvram:
            fake.record("lowvram.send_everything_to_cpu")  # real: only the module the hooks put on the GPU moves
        else:
            m.to(devices.cpu)

    devices.torch_gc()


def model_target_device(m: Any) -> torch.device:
    return devices.cpu if _lowvram_is_needed(m) else devices.device


def send_model_to_device(m: FakeSdModel) -> None:
    fake.record("sd_models.send_model_to_device", model=m)
    m.lowvram = _lowvram_is_needed(m)  # real: lowvram.apply(m) (and installs the hooks)
    shared.parallel_processing_allowed = not m.lowvram
    if not m.lowvram:
        m.to(shared.device)


def send_model_to_trash(m: FakeSdModel) -> None:
    fake.record("sd_models.send_model_to_trash", model=m)
    m.to(device="meta")
    devices.torch_gc()


def load_model(
    checkpoint_info: CheckpointInfo | None = None, already_loaded_state_dict: dict[str, Any] | None = None
) -> FakeSdModel:
    checkpoint_info = checkpoint_info or select_checkpoint()
    fake.record("sd_models.load_model", filename=checkpoint_info.filename)

    if model_data.sd_model:
        send_model_to_trash(model_data.sd_model)
        model_data.sd_model = None
        devices.torch_gc()

    if already_loaded_state_dict is not None:
        state_dict = already_loaded_state_dict
    else:
        state_dict = get_checkpoint_state_dict(checkpoint_info)

    sd_model = FakeSdModel()
    sd_model.used_config = find_checkpoint_config(state_dict, checkpoint_info)
    load_model_weights(sd_model, checkpoint_info, state_dict)
    send_model_to_device(sd_model)
    sd_hijack.model_hijack.hijack(sd_model)
    sd_model.eval()
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


def reuse_model_from_already_loaded(
    sd_model: FakeSdModel | None, checkpoint_info: CheckpointInfo, timer: Any = None
) -> FakeSdModel | None:
    from modules import sd_vae

    if sd_model is not None and sd_model.sd_checkpoint_info.filename == checkpoint_info.filename:
        return sd_model

    if shared.opts.sd_checkpoints_keep_in_cpu:
        send_model_to_cpu(sd_model)

    already_loaded = None
    for i in reversed(range(len(model_data.loaded_sd_models))):
        loaded_model = model_data.loaded_sd_models[i]
        if loaded_model.sd_checkpoint_info.filename == checkpoint_info.filename:
            already_loaded = loaded_model
            continue

        if len(model_data.loaded_sd_models) > shared.opts.sd_checkpoints_limit > 0:
            del model_data.loaded_sd_models[i]
            send_model_to_trash(loaded_model)

    if already_loaded is not None:
        send_model_to_device(already_loaded)
        model_data.set_sd_model(already_loaded, already_loaded=True)
        if not SkipWritingToConfig.skip:
            shared.opts.data["sd_model_checkpoint"] = already_loaded.sd_checkpoint_info.title
            shared.opts.data["sd_checkpoint_hash"] = already_loaded.sd_checkpoint_info.sha256
        sd_vae.reload_vae_weights(already_loaded)
        return model_data.sd_model
    if shared.opts.sd_checkpoints_limit > 1 and len(model_data.loaded_sd_models) < shared.opts.sd_checkpoints_limit:
        model_data.sd_model = None
        load_model(checkpoint_info)
        return model_data.sd_model
    if len(model_data.loaded_sd_models) > 0:
        sd_model = model_data.loaded_sd_models.pop()
        model_data.sd_model = sd_model
        sd_vae.base_vae = getattr(sd_model, "base_vae", None)
        sd_vae.loaded_vae_file = getattr(sd_model, "loaded_vae_file", None)
        sd_vae.checkpoint_info = sd_model.sd_checkpoint_info
        return sd_model
    return None


def reload_model_weights(
    sd_model: FakeSdModel | None = None, info: CheckpointInfo | None = None, forced_reload: bool = False
) -> FakeSdModel | None:
    if faults.ignore_switch:
        fake.record("sd_models.reload_model_weights", outcome="ignored (fault)")
        return sd_model or model_data.sd_model

    checkpoint_info = info or select_checkpoint()

    if not sd_model:
        sd_model = model_data.sd_model

    if sd_model is None:  # previous model load failed
        current_checkpoint_info = None
    else:
        current_checkpoint_info = sd_model.sd_checkpoint_info
        if check_fp8(sd_model) != devices.fp8:
            # load from state dict again to prevent extra numerical errors
            forced_reload = True
        elif sd_model.sd_model_checkpoint == checkpoint_info.filename and not forced_reload:
            fake.record("sd_models.reload_model_weights", outcome="already loaded (early return)")
            return sd_model

    fake.record("sd_models.reload_model_weights", outcome="loading", filename=checkpoint_info.filename)
    sd_model = reuse_model_from_already_loaded(sd_model, checkpoint_info)
    if not forced_reload and sd_model is not None and sd_model.sd_checkpoint_info.filename == checkpoint_info.filename:
        return sd_model

    if sd_model is not None:
        send_model_to_cpu(sd_model)
        sd_hijack.model_hijack.undo_hijack(sd_model)

    # real: an exception here (unreadable file) leaves the old model on the CPU and un-hijacked
    state_dict = get_checkpoint_state_dict(checkpoint_info)
    checkpoint_config = find_checkpoint_config(state_dict, checkpoint_info)

    if sd_model is None or checkpoint_config != sd_model.used_config:
        if sd_model is not None:
            send_model_to_trash(sd_model)
        load_model(checkpoint_info, already_loaded_state_dict=state_dict)
        return model_data.sd_model

    try:
        load_model_weights(sd_model, checkpoint_info, state_dict)
    except Exception:
        print("Failed to load checkpoint, restoring previous")
        load_model_weights(sd_model, current_checkpoint_info, None)
        raise
    finally:
        sd_hijack.model_hijack.hijack(sd_model)
        if not sd_model.lowvram:
            sd_model.to(devices.device)
        script_callbacks.model_loaded_callback(sd_model)

    model_data.set_sd_model(sd_model)
    return sd_model


def unload_model_weights(sd_model: FakeSdModel | None = None, info: CheckpointInfo | None = None) -> FakeSdModel | None:
    fake.record("sd_models.unload_model_weights")
    send_model_to_cpu(sd_model or shared.sd_model)
    return sd_model


def reset() -> None:
    """Fake only: no checkpoints listed, no model loaded, empty hash cache, no faults."""
    checkpoints_list.clear()
    checkpoint_aliases.clear()
    checkpoints_loaded.clear()
    sha256_cache.clear()
    model_data.sd_model = None
    model_data.loaded_sd_models.clear()
    model_data.was_loaded_at_least_once = False
    faults.unreadable.clear()
    faults.ignore_switch = False
    SkipWritingToConfig.skip = False
