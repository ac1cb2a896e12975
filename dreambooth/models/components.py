"""Trainable components of a Stable Diffusion model, and their conversion from / to files and folders.

``load_components`` reads an original single file (``.safetensors`` / ``.ckpt``, with its sidecar yaml), an
in-memory original-format state dict (the WebUI's loaded model) or a diffusers folder.  ``save_single_file`` writes
the components back as one file the WebUI loads; ``save_diffusers_folder`` writes a diffusers folder.  Tensors
that belong to no trained component travel along as ``extras`` so that no key of the original file is lost.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import __version__
from ..compat import load_text_encoder_state_dict, quiet_bitsandbytes, text_encoder_state_dict
from ..errors import ModelFileError, one_line
from . import files
from .architecture import CLIP_L, METADATA_KEY, Architecture, detect_architecture
from .keymap import join_original, split_original

ARCH_FILE = "dreambooth.json"
EXTRAS_FILE = "dreambooth_extras.safetensors"
EMA_PREFIX = "model_ema."  # ldm's EMA copy of the UNet in original checkpoints


@dataclass
class Components:
    """The parts a DreamBooth run trains or uses, plus what is needed to write them back losslessly."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    arch: Architecture
    extras: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    text_encoder_2: Any = None  # SDXL: CLIPTextModelWithProjection (OpenCLIP ViT-bigG)
    tokenizer_2: Any = None  # SDXL: the same CLIP BPE, padding with "!"

    @property
    def modules(self) -> list[Any]:
        """The networks: UNet, VAE and the text encoder(s)."""
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def to(self, device: Any = None, dtype: Any = None) -> Components:
        for module in self.modules:
            current = next(module.parameters())
            if dtype is not None and current.dtype != dtype:
                module.to(dtype=dtype)
            if device is not None and current.device != _device(device):
                module.to(device=device)
        return self


def _device(device: Any) -> Any:
    import torch

    return torch.device(device)


# ------------------------------------------------------------------------------------------------- building


def _on_meta(factory: Any) -> Any:
    """Build a module without allocating or initialising its weights (they are loaded right after)."""
    import torch

    with torch.device("meta"):
        return factory()


def _load_into(module: Any, state_dict: dict[str, Any], what: str, source: str) -> None:
    try:
        module.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise ModelFileError(
            f"{source}: the {what} weights do not fit the detected architecture: {one_line(error)}"
        ) from error
    _materialize_buffers(module, what, source)


def _materialize_buffers(module: Any, what: str, source: str) -> None:
    """Create the buffers left on the meta device: CLIP's ``position_ids`` (derived from the config)."""
    import torch

    for name, buffer in list(module.named_buffers()):
        if buffer.is_meta:
            if not name.endswith("position_ids"):
                raise ModelFileError(f"{source}: the {what} buffer '{name}' is not in the checkpoint.")
            owner = module.get_submodule(name.rsplit(".", 1)[0])
            persistent = name in module.state_dict()
            ids = torch.arange(buffer.shape[-1]).expand((1, -1))
            owner.register_buffer("position_ids", ids, persistent=persistent)


def build_unet(arch: Architecture) -> Any:
    with quiet_bitsandbytes():  # diffusers' models import bitsandbytes when it is installed
        from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**arch.unet)


def build_vae(arch: Architecture) -> Any:
    with quiet_bitsandbytes():
        from diffusers import AutoencoderKL

    return AutoencoderKL(**arch.vae)


def build_text_encoder(arch: Architecture) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**arch.text))


def build_text_encoder_2(arch: Architecture) -> Any:
    """SDXL's second text encoder (None for the other families)."""
    if arch.text_2 is None:
        return None
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    return CLIPTextModelWithProjection(CLIPTextConfig(**arch.text_2))


def build_scheduler(arch: Architecture) -> Any:
    from diffusers import DDPMScheduler

    return DDPMScheduler(**arch.scheduler_config())


def build_tokenizer(arch: Architecture) -> Any:
    """The tokenizer folder a sidecar yaml names (SD 1.x), else the CLIP vocabulary shipped by open-clip-torch."""
    if arch.clip_version and (Path(arch.clip_version) / "vocab.json").is_file():
        from transformers import CLIPTokenizer

        return CLIPTokenizer.from_pretrained(arch.clip_version, local_files_only=True)
    from .tokenizer import clip_tokenizer

    # SDXL's first tokenizer is SD 1.x's (pads with <|endoftext|>)
    return clip_tokenizer("sd1" if arch.is_sdxl else arch.family, max_length=arch.text["max_position_embeddings"])


def build_tokenizer_2(arch: Architecture) -> Any:
    """SDXL's second tokenizer: the same BPE, padding with "!" as OpenCLIP does (diffusers' ``tokenizer_2``)."""
    if arch.text_2 is None:
        return None
    from .tokenizer import clip_tokenizer

    return clip_tokenizer("sd2", max_length=arch.text_2["max_position_embeddings"])


def _load_text_encoder(module: Any, state_dict: dict[str, Any], what: str, source: str) -> None:
    try:
        load_text_encoder_state_dict(module, state_dict, assign=True)
    except RuntimeError as error:
        raise ModelFileError(f"{source}: the {what} weights do not fit: {one_line(error)}") from error
    _materialize_buffers(module, what, source)


def guess_v_prediction(unet: Any) -> bool:
    """The WebUI's test for SD 2.x 768 models: a v-prediction UNet moves a grey latent strongly at t=999."""
    import torch

    parameter = next(unet.parameters())
    with torch.no_grad():
        context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, dtype=torch.float32)
        latent = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=torch.float32)
        original = parameter.dtype
        unet.to(torch.float32)
        out = unet(latent, torch.tensor([999]), encoder_hidden_states=context).sample
        unet.to(original)
    return (out - latent).mean().item() < -1


# -------------------------------------------------------------------------------------------------- loading


def components_from_state_dict(
    state_dict: dict[str, Any],
    source: str = "state dict",
    yaml_config: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    device: Any = "cpu",
    dtype: Any = None,
    arch: Architecture | None = None,
) -> Components:
    """Components from an original-format state dict (a file's tensors, or the WebUI's model in memory).

    The tensors are adopted, not copied, when they already have the requested device and dtype: pass a copy
    if the source must stay untouched while the components are trained.
    """
    import torch

    arch = arch or detect_architecture(state_dict, source, yaml_config=yaml_config, metadata=metadata)
    parts = split_original(state_dict, arch, source)
    unet = _on_meta(lambda: build_unet(arch))
    _load_into(unet, parts["unet"], "UNet", source)
    vae = _on_meta(lambda: build_vae(arch))
    _load_into(vae, parts["vae"], "VAE", source)
    text_encoder = _on_meta(lambda: build_text_encoder(arch))
    _load_text_encoder(text_encoder, parts["text_encoder"], "text encoder", source)
    text_encoder_2 = None
    if arch.text_2 is not None:
        text_encoder_2 = _on_meta(lambda: build_text_encoder_2(arch))
        _load_text_encoder(text_encoder_2, parts["text_encoder_2"], "second text encoder", source)
    if arch.family == "sd2" and arch.prediction_source == "default" and arch.is_standard_size:
        if guess_v_prediction(unet):
            arch.prediction_type = "v_prediction"
        arch.prediction_source = "guess"
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_tokenizer(arch),
        noise_scheduler=build_scheduler(arch),
        arch=arch,
        extras=parts["extras"],
        source=source,
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tokenizer_2(arch),
    )
    for module in components.modules:
        module.requires_grad_(False).eval()
    return components.to(device=device, dtype=dtype or torch.float32)


def drop_base_ema(components: Components) -> int:
    """Remove the base file's EMA copy of the UNet (``model_ema.*``, e.g. in ``v1-5-pruned.ckpt``) from the tensors
    written back with the components; returns how many tensors were removed.

    Training does not update that copy: carried into outputs it doubles their size, and a loader that prefers EMA
    weights would get the untrained base model.  A run that trains its own EMA puts it into ``extras`` after this.
    """
    stale = [key for key in components.extras if key.startswith(EMA_PREFIX)]
    for key in stale:
        del components.extras[key]
    return len(stale)


def load_vae(path: str | os.PathLike, arch: Architecture) -> tuple[Any, Architecture]:
    """A separate VAE for ``arch``'s model: a diffusers VAE folder, or a single file with ``first_stage_model.*``
    keys or bare VAE keys (the usual ``.vae.safetensors``).  Returns the VAE and the architecture updated to it."""
    import dataclasses

    from .architecture import VAE, vae_structure

    source = Path(path)
    if source.is_dir():
        with quiet_bitsandbytes():
            from diffusers import AutoencoderKL

        from .folders import load_diffusers_model

        vae = load_diffusers_model(AutoencoderKL, source, "VAE")
        return vae.requires_grad_(False).eval(), arch
    state, _ = files.read_state_dict(source)
    if not any(k.startswith(VAE) for k in state):
        state = {VAE + k: v for k, v in state.items()}
    state = {k: v for k, v in state.items() if k.startswith(VAE)}
    arch = dataclasses.replace(arch, vae={**arch.vae, **vae_structure(state, str(source))})
    vae = _on_meta(lambda: build_vae(arch))
    _load_into(vae, split_original(state, arch, str(source))["vae"], "VAE", str(source))
    return vae.requires_grad_(False).eval(), arch


def load_components(
    path: str | os.PathLike,
    device: Any = "cpu",
    dtype: Any = None,
    original_config: str | os.PathLike | None = None,
) -> Components:
    """Load a single-file checkpoint (with ``NAME.yaml`` beside it, if any) or a diffusers folder."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path, device=device, dtype=dtype)
    state_dict, metadata = files.read_state_dict(path)
    yaml_path = Path(original_config) if original_config else files.sidecar_yaml_path(path)
    yaml_config = files.read_yaml(yaml_path) if yaml_path.is_file() else None
    if original_config and yaml_config is None:
        raise ModelFileError(f"{original_config}: the config yaml given with --original-config does not exist.")
    return components_from_state_dict(
        state_dict, str(path), yaml_config=yaml_config, metadata=metadata, device=device, dtype=dtype
    )


def arch_from_diffusers_configs(folder: Path) -> Architecture:
    """An Architecture from a diffusers folder's own configs (one without our ``dreambooth.json``)."""

    def read(part: str) -> dict[str, Any]:
        config_file = folder / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
        if not config_file.is_file():
            raise ModelFileError(f"{folder}: not a diffusers model folder ({config_file} is missing).")
        return {k: v for k, v in json.loads(config_file.read_text()).items() if not k.startswith("_")}

    from .architecture import SD_SCHEDULE
    from .folders import check_family

    family = check_family(folder)
    unet, vae, text, scheduler = read("unet"), read("vae"), read("text_encoder"), read("scheduler")
    if family == "sdxl":
        from .sdxl import arch_from_sdxl_configs

        return arch_from_sdxl_configs(unet, vae, text, read("text_encoder_2"), scheduler)
    family = "sd2" if text.get("hidden_act") == "gelu" else "sd1"
    text_keys = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "projection_dim",
        "pad_token_id",
        "bos_token_id",
        "eos_token_id",
    ]
    layers = int(text["num_hidden_layers"])
    return Architecture(
        family=family,
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        unet=unet,
        vae=vae,
        text={k: text[k] for k in text_keys if k in text},
        text_blocks_in_file=layers + 1 if family == "sd2" else layers,
        schedule={
            "timesteps": scheduler.get("num_train_timesteps", SD_SCHEDULE["timesteps"]),
            "linear_start": scheduler.get("beta_start", SD_SCHEDULE["linear_start"]),
            "linear_end": scheduler.get("beta_end", SD_SCHEDULE["linear_end"]),
        },
        scale_factor=float(vae.get("scaling_factor", 0.18215)),
        prediction_source="config",
    )


def folder_architecture(folder: Path) -> Architecture:
    """The architecture of a diffusers folder from its files alone: our own record when we wrote it (after the
    family check), else its components' configs."""
    from .folders import check_family

    arch_file = folder / ARCH_FILE
    if arch_file.is_file():
        check_family(folder)
        return Architecture.from_json(arch_file.read_text())
    return arch_from_diffusers_configs(folder)


def load_diffusers_folder(folder: str | os.PathLike, device: Any = "cpu", dtype: Any = None) -> Components:
    """Components from a diffusers folder (``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ...)."""
    import torch
    from transformers import CLIPTokenizer

    with quiet_bitsandbytes():
        from diffusers import AutoencoderKL, UNet2DConditionModel

    from .folders import load_diffusers_model, load_text_encoder

    folder = Path(folder)
    arch = folder_architecture(folder)
    unet = load_diffusers_model(UNet2DConditionModel, folder / "unet", "UNet")
    vae = load_diffusers_model(AutoencoderKL, folder / "vae", "VAE")
    text_encoder = load_text_encoder(folder / "text_encoder")
    if (folder / "tokenizer" / "vocab.json").is_file():
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    else:
        tokenizer = build_tokenizer(arch)
    text_encoder_2 = tokenizer_2 = None
    if arch.is_sdxl:
        text_encoder_2 = load_text_encoder(folder / "text_encoder_2", with_projection=True)
        if (folder / "tokenizer_2" / "vocab.json").is_file():
            tokenizer_2 = CLIPTokenizer.from_pretrained(folder / "tokenizer_2", local_files_only=True)
        else:
            tokenizer_2 = build_tokenizer_2(arch)
    extras = {}
    if (folder / EXTRAS_FILE).is_file():
        extras, _ = files.read_state_dict(folder / EXTRAS_FILE)
    components = Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        noise_scheduler=build_scheduler(arch),
        arch=arch,
        extras=extras,
        source=str(folder),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
    )
    for module in components.modules:
        module.requires_grad_(False).eval()
    return components.to(device=device, dtype=dtype or torch.float32)


# --------------------------------------------------------------------------------------------------- saving


def to_original_state_dict(components: Components, half: bool = False) -> dict[str, Any]:
    """The components as one original-format (ldm / WebUI) state dict, on the CPU."""
    import torch

    arch = components.arch
    extras = dict(components.extras)
    if arch.family in ("sd1", "sdxl"):  # the CLIP ViT-L buffer that the released files (and the WebUI's model) hold
        from .sdxl import CLIP_L_XL

        key = (CLIP_L if arch.family == "sd1" else CLIP_L_XL) + "embeddings.position_ids"
        extras.setdefault(key, torch.arange(arch.text["max_position_embeddings"]).unsqueeze(0))
    state_dict = join_original(
        _cpu(components.unet.state_dict()),
        _cpu(components.vae.state_dict()),
        _cpu(text_encoder_state_dict(components.text_encoder)),
        arch,
        extras,
        text_2_sd=(
            _cpu(text_encoder_state_dict(components.text_encoder_2)) if components.text_encoder_2 is not None else None
        ),
    )
    dtype = torch.float16 if half else torch.float32  # fp32 also for weights trained in bf16 (full_bf16): exact
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def _cpu(state_dict: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach() if v.is_meta else v.detach().to("cpu") for k, v in state_dict.items()}


def save_single_file(
    components: Components,
    destination: str | os.PathLike,
    half: bool = False,
    metadata: dict[str, str] | None = None,
    sidecar: bool | None = None,
) -> list[Path]:
    """Write one original-format checkpoint (``.safetensors`` or ``.ckpt``), plus ``NAME.yaml`` when needed.

    ``sidecar=None`` writes the yaml when the architecture needs one (SD 2.x, inpainting, non-standard sizes).
    Returns the written paths.  Every write is atomic.
    """
    destination = Path(destination)
    state_dict = to_original_state_dict(components, half=half)
    header = {
        "format": "pt",
        METADATA_KEY: components.arch.to_json(),
        "dreambooth.version": __version__,
        "dreambooth.architecture_name": components.arch.name,
        **(metadata or {}),
    }
    written = [files.write_state_dict(state_dict, destination, metadata=header)]
    if sidecar if sidecar is not None else components.arch.needs_sidecar_yaml:
        from .architecture import ldm_yaml

        written.append(files.write_yaml(ldm_yaml(components.arch), files.sidecar_yaml_path(destination)))
    return written


def save_diffusers_folder(components: Components, destination: str | os.PathLike, half: bool = False) -> Path:
    """Write a diffusers folder; written beside the destination first and renamed into place when complete."""
    import shutil
    import tempfile

    import torch

    destination = Path(destination)
    if destination.exists():
        raise ModelFileError(f"{destination}: already exists; choose a new folder name (nothing was overwritten).")
    destination.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        dtype = torch.float16 if half else None
        for name, module in (("unet", components.unet), ("vae", components.vae)):
            _save_module(module, temp / name, dtype)
        _save_module(components.text_encoder, temp / "text_encoder", dtype)
        components.tokenizer.save_pretrained(str(temp / "tokenizer"))
        if components.text_encoder_2 is not None:
            _save_module(components.text_encoder_2, temp / "text_encoder_2", dtype)
            components.tokenizer_2.save_pretrained(str(temp / "tokenizer_2"))
        components.noise_scheduler.save_pretrained(str(temp / "scheduler"))
        (temp / ARCH_FILE).write_text(components.arch.to_json())
        (temp / "model_index.json").write_text(json.dumps(_model_index(components.arch), indent=2))
        if components.extras:
            extras = components.extras
            if half:
                extras = {k: v.half() if v.is_floating_point() else v for k, v in extras.items()}
            files.write_state_dict(extras, temp / EXTRAS_FILE)
        temp.rename(destination)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return destination


def _save_module(module: Any, folder: Path, dtype: Any) -> None:
    import copy

    if dtype is not None:
        module = copy.deepcopy(module).to(dtype)
    module.save_pretrained(str(folder), safe_serialization=True)


def _model_index(arch: Architecture) -> dict[str, Any]:
    if arch.is_sdxl:
        from .sdxl import model_index

        return model_index(_version("diffusers"))
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": _version("diffusers"),
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
