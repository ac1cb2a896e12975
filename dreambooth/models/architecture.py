"""Which Stable Diffusion a checkpoint is, read from its weights (plus a sidecar yaml or our own metadata).

The structure of each network (levels, channels, layers, which levels have attention) is derived from the tensor
names and shapes, so any UNet/VAE/CLIP built the Stable Diffusion way is understood.  What weights cannot tell
(attention head counts, epsilon vs v-prediction, noise schedule) comes, in this order, from our own metadata in the
safetensors header, from the sidecar ``NAME.yaml`` (the WebUI convention), or from the defaults of the family
(SD 1.x / SD 2.x) -- the configs of the real models, shipped here so no model hub is ever asked.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFileError, UnsupportedModelError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP_L = "cond_stage_model.transformer.text_model."  # SD 1.x: transformers' CLIPTextModel inside ldm
OPEN_CLIP = "cond_stage_model.model."  # SD 2.x: OpenCLIP's text transformer
CONDITIONER = "conditioner.embedders."  # sgm layout (SDXL): models/sdxl.py

METADATA_KEY = "dreambooth.architecture"

# The noise schedule and latent scale of every SD 1.x / 2.x model (ldm's v1/v2 inference yamls).
SD_SCHEDULE = {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012}
SD_SCALE_FACTOR = 0.18215


@dataclass
class Architecture:
    """Everything needed to build the components of one checkpoint and to write it back.

    ``unet`` / ``vae`` / ``text`` are constructor keyword arguments of diffusers' ``UNet2DConditionModel``,
    ``AutoencoderKL`` and transformers' ``CLIPTextConfig``.  ``text_blocks_in_file`` is the number of text
    transformer blocks the single file holds (SD 2.x files hold one more than the penultimate-layer encoder uses).
    """

    family: str  # "sd1" (CLIP ViT-L), "sd2" (OpenCLIP ViT-H) or "sdxl" (CLIP ViT-L + OpenCLIP ViT-bigG)
    prediction_type: str  # "epsilon" or "v_prediction"
    unet: dict[str, Any]
    vae: dict[str, Any]
    text: dict[str, Any]
    text_blocks_in_file: int
    schedule: dict[str, Any] = field(default_factory=lambda: dict(SD_SCHEDULE))
    scale_factor: float = SD_SCALE_FACTOR
    clip_version: str | None = None  # SD 1.x: the text-encoder/tokenizer folder a sidecar yaml names
    prediction_source: str = "default"  # where prediction_type came from: metadata, yaml, default, guess
    text_2: dict[str, Any] | None = None  # SDXL: CLIPTextConfig arguments of the second (OpenCLIP bigG) encoder
    # SDXL: how the file stores bigG's projection: "openclip" (``text_projection``, used as x @ P, the released
    # layout) or "linear" (``text_projection.weight`` = P transposed, found in some merged files); written back alike
    projection_layout: str = "openclip"

    @property
    def is_v_prediction(self) -> bool:
        return self.prediction_type == "v_prediction"

    @property
    def is_inpainting(self) -> bool:
        return self.unet["in_channels"] == 9

    @property
    def is_sdxl(self) -> bool:
        return self.family == "sdxl"

    @property
    def name(self) -> str:
        if self.family == "sdxl":
            label = "SDXL (v-prediction)" if self.is_v_prediction else "SDXL"
        elif self.family == "sd1":
            label = "SD 1.x"
        else:
            label = "SD 2.x 768 (v-prediction)" if self.is_v_prediction else "SD 2.x 512 (epsilon)"
        if self.is_inpainting:
            label += " inpainting"
        if not self.is_standard_size:
            label += " (non-standard size)"
        return label

    @property
    def is_standard_size(self) -> bool:
        """True for the sizes of the released SD 1.x / 2.x / SDXL models (the WebUI needs no yaml for those)."""
        if self.family == "sdxl":
            from .sdxl import is_standard_sdxl

            return is_standard_sdxl(self)
        want_context, want_hidden = (768, 768) if self.family == "sd1" else (1024, 1024)
        return (
            list(self.unet["block_out_channels"]) == [320, 640, 1280, 1280]
            and self.unet["cross_attention_dim"] == want_context
            and self.text["hidden_size"] == want_hidden
            and list(self.vae["block_out_channels"]) == [128, 256, 512, 512]
        )

    @property
    def needs_sidecar_yaml(self) -> bool:
        """Whether the WebUI needs ``NAME.yaml`` beside the file to build the right model."""
        if self.family == "sdxl":  # the WebUI picks sd_xl_base.yaml from the keys: epsilon at the released size
            return not self.is_standard_size or self.is_v_prediction or self.is_inpainting
        return not (self.family == "sd1" and self.is_standard_size and not self.is_inpainting)

    def scheduler_config(self) -> dict[str, Any]:
        """Keyword arguments of diffusers' ``DDPMScheduler`` (the training noise schedule)."""
        return {
            "num_train_timesteps": int(self.schedule["timesteps"]),
            "beta_start": float(self.schedule["linear_start"]),
            "beta_end": float(self.schedule["linear_end"]),
            "beta_schedule": "scaled_linear",
            "prediction_type": self.prediction_type,
            "clip_sample": False,
            "steps_offset": 1,
        }

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        data = json.loads(text)
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# --------------------------------------------------------------------------------------------------- reading


def _indices(keys: list[str], pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def _require(state_dict: dict[str, Any], key: str, source: str) -> Any:
    if key not in state_dict:
        raise ModelFileError(
            f"{source}: expected tensor '{key}' is missing; the file is not a complete Stable Diffusion "
            "checkpoint (SD 1.x / 2.x / SDXL). Check that it is not a LoRA, an embedding or a VAE-only file."
        )
    return state_dict[key]


def unet_structure(sd: dict[str, Any], source: str) -> dict[str, Any]:
    """UNet2DConditionModel arguments that follow from the weights (head counts excluded)."""
    keys = [k for k in sd if k.startswith(UNET)]
    conv_in = _require(sd, UNET + "input_blocks.0.0.weight", source)
    in_channels = int(conv_in.shape[1])
    out_channels = int(_require(sd, UNET + "out.2.weight", source).shape[0])
    levels: list[list[int]] = [[]]  # input block indices of the resnets, per level
    for index in _indices(keys, re.escape(UNET) + r"input_blocks\.(\d+)\."):
        if index == 0:
            continue
        if UNET + f"input_blocks.{index}.0.op.weight" in sd:
            levels.append([])
        else:
            levels[-1].append(index)
    if not levels[0]:
        raise ModelFileError(f"{source}: the UNet has no input blocks; the file is not an SD 1.x/2.x model.")
    layers_per_block = len(levels[0])
    channels, has_attention = [], []
    for blocks in levels:
        first = blocks[0]
        channels.append(int(_require(sd, UNET + f"input_blocks.{first}.0.out_layers.3.weight", source).shape[0]))
        has_attention.append(UNET + f"input_blocks.{first}.1.proj_in.weight" in sd)
    first_attn = next((blocks[0] for blocks, a in zip(levels, has_attention) if a), None)
    if first_attn is None:
        raise ModelFileError(f"{source}: the UNet has no cross-attention; the file is not an SD 1.x/2.x model.")
    prefix = UNET + f"input_blocks.{first_attn}.1."
    # Transformer blocks per level (SDXL: 1, 2, 10 at full size); one number when all attention levels agree.
    depths = [
        len(_indices(keys, re.escape(UNET + f"input_blocks.{blocks[0]}.1.") + r"transformer_blocks\.(\d+)\."))
        for blocks in levels
    ]
    used = {d for d, a in zip(depths, has_attention) if a}
    depth: int | list[int] = used.pop() if len(used) == 1 else [d if a else 1 for d, a in zip(depths, has_attention)]
    context_dim = int(_require(sd, prefix + "transformer_blocks.0.attn2.to_k.weight", source).shape[1])
    linear = _require(sd, prefix + "proj_in.weight", source).ndim == 2
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in has_attention]
    up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(has_attention)]
    return {
        "in_channels": in_channels,
        "out_channels": out_channels,
        "block_out_channels": channels,
        "down_block_types": down,
        "up_block_types": up,
        "layers_per_block": layers_per_block,
        "cross_attention_dim": context_dim,
        "use_linear_projection": linear,
        "transformer_layers_per_block": depth,
        "norm_num_groups": 32,
    }


def vae_structure(sd: dict[str, Any], source: str) -> dict[str, Any]:
    """AutoencoderKL arguments that follow from the weights."""
    keys = [k for k in sd if k.startswith(VAE)]
    _require(sd, VAE + "encoder.conv_in.weight", source)
    levels = _indices(keys, re.escape(VAE) + r"encoder\.down\.(\d+)\.")
    if not levels:
        raise ModelFileError(f"{source}: no VAE weights (first_stage_model.*) found.")
    layers = len(_indices(keys, re.escape(VAE) + r"encoder\.down\.0\.block\.(\d+)\."))
    channels = [int(_require(sd, VAE + f"encoder.down.{i}.block.0.conv1.weight", source).shape[0]) for i in levels]
    latent = int(_require(sd, VAE + "post_quant_conv.weight", source).shape[0])
    return {
        "in_channels": int(sd[VAE + "encoder.conv_in.weight"].shape[1]),
        "out_channels": int(_require(sd, VAE + "decoder.conv_out.weight", source).shape[0]),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": channels,
        "layers_per_block": layers,
        "latent_channels": latent,
        "norm_num_groups": 32,
    }


def clip_structure(sd: dict[str, Any], prefix: str, source: str) -> tuple[dict[str, Any], int]:
    """CLIPTextConfig arguments of a transformers-layout CLIP text model under ``prefix`` (``...text_model.``)."""
    token = _require(sd, prefix + "embeddings.token_embedding.weight", source)
    positions = _require(sd, prefix + "embeddings.position_embedding.weight", source)
    blocks = len(_indices(list(sd), re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
    inner = _require(sd, prefix + "encoder.layers.0.mlp.fc1.weight", source)
    hidden = int(token.shape[1])
    return _clip_config(token, positions, inner, blocks, "quick_gelu", 49407, hidden), blocks


def open_clip_structure(sd: dict[str, Any], prefix: str, source: str) -> tuple[dict[str, Any], int]:
    """CLIPTextConfig arguments of an OpenCLIP text transformer under ``prefix`` (all its blocks as layers)."""
    token = _require(sd, prefix + "token_embedding.weight", source)
    positions = _require(sd, prefix + "positional_embedding", source)
    blocks = len(_indices(list(sd), re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    inner = _require(sd, prefix + "transformer.resblocks.0.mlp.c_fc.weight", source)
    projection, linear = sd.get(prefix + "text_projection"), sd.get(prefix + "text_projection.weight")
    if projection is not None:
        projection_dim = int(projection.shape[1])  # stored for x @ P: (hidden, projection)
    elif linear is not None:
        projection_dim = int(linear.shape[0])  # a Linear's weight: (projection, hidden)
    else:
        projection_dim = int(token.shape[1])
    # OpenCLIP pads with id 0 (the token "!")
    return _clip_config(token, positions, inner, blocks, "gelu", 0, projection_dim), blocks


def _clip_config(token: Any, positions: Any, inner: Any, layers: int, act: str, pad: int, projection: int) -> dict:
    hidden = int(token.shape[1])
    return {
        "vocab_size": int(token.shape[0]),
        "hidden_size": hidden,
        "intermediate_size": int(inner.shape[0]),
        "num_hidden_layers": layers,
        "num_attention_heads": max(1, hidden // 64),  # not in the weights: the released models' 64 per head
        "max_position_embeddings": int(positions.shape[0]),
        "hidden_act": act,
        "projection_dim": projection,
        "pad_token_id": pad,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }


def text_structure(sd: dict[str, Any], family: str, source: str) -> tuple[dict[str, Any], int]:
    """CLIPTextConfig arguments that follow from the weights, and the number of blocks in the file."""
    if family == "sd1":
        return clip_structure(sd, CLIP_L, source)
    text, blocks = open_clip_structure(sd, OPEN_CLIP, source)
    # SD 2.x conditions on the penultimate block: the encoder we train has one block less than the file.
    text["num_hidden_layers"] = blocks - 1
    return text, blocks


def unsupported(source: str, family: str, evidence: str) -> UnsupportedModelError:
    """The one wording for a model of another family, for single files and diffusers folders alike."""
    return UnsupportedModelError(
        f"{source}: the model is {family} ({evidence}); {family} is not supported yet: "
        "choose an SD 1.x, SD 2.x or SDXL base model."
    )


def detect_family(sd: dict[str, Any], source: str) -> str:
    """The family ("sd1", "sd2" or "sdxl") from the key names; other families are refused by name."""
    if any(k.startswith(("double_blocks.", UNET + "double_blocks.")) for k in sd):
        raise unsupported(source, "Flux-class", "it has double_blocks.* weights")
    if any(k.startswith(UNET + "joint_blocks.") for k in sd):
        raise unsupported(source, "SD3", "it has model.diffusion_model.joint_blocks.* weights")
    if not any(k.startswith(UNET) for k in sd):
        raise ModelFileError(
            f"{source}: no UNet weights (model.diffusion_model.*) found; this is not a Stable Diffusion "
            "checkpoint. LoRA, VAE-only and embedding files cannot be trained here."
        )
    if any(k.startswith(CONDITIONER) for k in sd):
        from .sdxl import sgm_family

        return sgm_family(sd, source)
    if any(k.startswith(CLIP_L) for k in sd):
        return "sd1"
    if any(k.startswith(OPEN_CLIP) for k in sd):
        return "sd2"
    raise ModelFileError(
        f"{source}: no text encoder weights (cond_stage_model.*) found; a DreamBooth base model must be a "
        "complete SD 1.x, 2.x or SDXL checkpoint."
    )


def _yaml_params(config: dict[str, Any] | None) -> dict[str, Any]:
    if not config:
        return {}
    return ((config.get("model") or {}).get("params")) or {}


def detect_architecture(
    sd: dict[str, Any],
    source: str,
    yaml_config: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
) -> Architecture:
    """Work out the architecture of an original-format state dict.

    ``yaml_config`` is the parsed sidecar yaml (ldm format) and ``metadata`` the safetensors header, when present.
    """
    if metadata and METADATA_KEY in metadata:
        # Our own file: its header describes it exactly.  A sidecar yaml still decides epsilon vs v, and the text
        # model folder it names (the WebUI loads through the yaml; the folder may have moved since the header).
        arch = Architecture.from_json(metadata[METADATA_KEY])
        arch.prediction_source = "metadata"
        if yaml_config is not None and arch.family == "sdxl":
            from .sdxl import apply_sgm_yaml

            apply_sgm_yaml(arch, yaml_config)
        elif yaml_config is not None:
            params = _yaml_params(yaml_config)
            parameterization = params.get("parameterization", "eps")
            arch.prediction_type = "v_prediction" if parameterization == "v" else "epsilon"
            arch.prediction_source = "yaml"
            cond_params = ((params.get("cond_stage_config") or {}).get("params")) or {}
            if arch.family == "sd1" and cond_params.get("version"):
                arch.clip_version = str(cond_params["version"])
        return arch
    family = detect_family(sd, source)
    if family == "sdxl":
        from .sdxl import sdxl_architecture

        return sdxl_architecture(sd, source, yaml_config)
    unet = unet_structure(sd, source)
    vae = vae_structure(sd, source)
    text, blocks = text_structure(sd, family, source)
    params = _yaml_params(yaml_config)
    unet_params = ((params.get("unet_config") or {}).get("params")) or {}
    cond_params = ((params.get("cond_stage_config") or {}).get("params")) or {}
    vae_params = (((params.get("first_stage_config") or {}).get("params")) or {}).get("ddconfig") or {}

    # Head counts: the yaml, else the family's convention (SD 1.x: 8 heads; SD 2.x: 64 channels per head).
    head_channels = unet_params.get("num_head_channels", -1)
    if head_channels not in (None, -1):
        unet["attention_head_dim"] = [max(1, c // int(head_channels)) for c in unet["block_out_channels"]]
    elif "num_heads" in unet_params:
        unet["attention_head_dim"] = int(unet_params["num_heads"])
    elif family == "sd2":
        unet["attention_head_dim"] = [max(1, c // 64) for c in unet["block_out_channels"]]
    else:
        unet["attention_head_dim"] = 8
    unet["sample_size"] = int(params.get("image_size", 64 if family == "sd1" else 96))
    vae["sample_size"] = int(vae_params.get("resolution", 256 if family == "sd1" else 768))
    vae["scaling_factor"] = float(params.get("scale_factor", SD_SCALE_FACTOR))

    clip_version = cond_params.get("version") if family == "sd1" else None
    if clip_version and (Path(clip_version) / "config.json").is_file():
        local = json.loads((Path(clip_version) / "config.json").read_text())
        text["num_attention_heads"] = int(local.get("num_attention_heads", text["num_attention_heads"]))
    if family == "sd2" and cond_params.get("layer") == "last":
        text["num_hidden_layers"] = blocks

    schedule = {k: params.get(k, v) for k, v in SD_SCHEDULE.items()}
    if "parameterization" in params:
        prediction = "v_prediction" if params["parameterization"] == "v" else "epsilon"
        prediction_source = "yaml"
    elif yaml_config is not None:
        prediction, prediction_source = "epsilon", "yaml"
    else:
        prediction, prediction_source = "epsilon", "default"
    return Architecture(
        family=family,
        prediction_type=prediction,
        unet=unet,
        vae=vae,
        text=text,
        text_blocks_in_file=blocks,
        schedule=schedule,
        scale_factor=vae["scaling_factor"],
        clip_version=clip_version,
        prediction_source=prediction_source,
    )


# --------------------------------------------------------------------------------------------------- writing


def released_vae(sample_size: int, scaling_factor: float) -> dict[str, Any]:
    """The diffusers config of the released SD 1.x / 2.x / SDXL autoencoder (the same shape in every family)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
    }


def ldm_vae_ddconfig(vae: dict[str, Any], resolution: int) -> dict[str, Any]:
    """The ldm / sgm yaml's ``ddconfig`` of the autoencoder described by the diffusers VAE config ``vae``."""
    first = vae["block_out_channels"][0]
    return {
        "double_z": True,
        "z_channels": vae["latent_channels"],
        "resolution": resolution,
        "in_channels": vae["in_channels"],
        "out_ch": vae["out_channels"],
        "ch": first,
        "ch_mult": [c // first for c in vae["block_out_channels"]],
        "num_res_blocks": vae["layers_per_block"],
        "attn_resolutions": [],
        "dropout": 0.0,
    }


def ldm_yaml(arch: Architecture) -> dict[str, Any]:
    """The ldm inference config (the WebUI's sidecar yaml) that builds this architecture."""
    if arch.family == "sdxl":
        from .sdxl import sgm_yaml

        return sgm_yaml(arch)
    unet, vae = arch.unet, arch.vae
    base = unet["block_out_channels"][0]
    attention = [2**i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")]
    unet_params: dict[str, Any] = {
        "use_checkpoint": True,
        "image_size": 32,
        "in_channels": unet["in_channels"],
        "out_channels": unet["out_channels"],
        "model_channels": base,
        "attention_resolutions": sorted(attention, reverse=True),
        "num_res_blocks": unet["layers_per_block"],
        "channel_mult": [c // base for c in unet["block_out_channels"]],
        "use_spatial_transformer": True,
        "transformer_depth": unet.get("transformer_layers_per_block", 1),
        "context_dim": unet["cross_attention_dim"],
        "legacy": False,
    }
    heads = unet["attention_head_dim"]
    if isinstance(heads, list):
        unet_params["num_head_channels"] = unet["block_out_channels"][0] // heads[0]
    else:
        unet_params["num_heads"] = heads
    if unet.get("use_linear_projection"):
        unet_params["use_linear_in_transformer"] = True
    if arch.family == "sd1":
        cond: dict[str, Any] = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
        if arch.clip_version:
            cond["params"] = {"version": arch.clip_version}
    else:
        layer = "last" if arch.text["num_hidden_layers"] == arch.text_blocks_in_file else "penultimate"
        cond = {
            "target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
            "params": {"freeze": True, "layer": layer},
        }
    params: dict[str, Any] = {
        **({"parameterization": "v"} if arch.is_v_prediction else {}),
        "linear_start": arch.schedule["linear_start"],
        "linear_end": arch.schedule["linear_end"],
        "num_timesteps_cond": 1,
        "log_every_t": 200,
        "timesteps": arch.schedule["timesteps"],
        "first_stage_key": "jpg",
        "cond_stage_key": "txt",
        "image_size": unet.get("sample_size", 64),
        "channels": vae["latent_channels"],
        "cond_stage_trainable": False,
        "conditioning_key": "hybrid" if arch.is_inpainting else "crossattn",
        "monitor": "val/loss_simple_ema",
        "scale_factor": arch.scale_factor,
        "use_ema": False,
        "unet_config": {
            "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
            "params": unet_params,
        },
        "first_stage_config": {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": vae["latent_channels"],
                "monitor": "val/rec_loss",
                "ddconfig": ldm_vae_ddconfig(vae, vae.get("sample_size", 256)),
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        },
        "cond_stage_config": cond,
    }
    target = "LatentInpaintDiffusion" if arch.is_inpainting else "LatentDiffusion"
    return {
        "model": {
            "base_learning_rate": 1.0e-4,
            "target": f"ldm.models.diffusion.ddpm.{target}",
            "params": params,
        }
    }
