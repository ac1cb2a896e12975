"""SDXL: the family's single-file layout (sgm, as Stability's generative-models and the WebUI write it) and its
diffusers folder, both directions, every key kept.

A single file holds ``model.diffusion_model.*`` (the UNet, with ``label_emb.0.{0,2}`` = diffusers'
``add_embedding``: the pooled text embedding and the six time ids), ``first_stage_model.*`` (the VAE),
``conditioner.embedders.0.transformer.text_model.*`` (CLIP ViT-L in transformers' own layout = diffusers'
``text_encoder``, a ``CLIPTextModel``) and ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG = diffusers'
``text_encoder_2``, a ``CLIPTextModelWithProjection``: q/k/v fused into ``in_proj``, and ``text_projection`` stored as
``x @ P``, i.e. the transpose of the linear layer's weight).  ``logit_scale`` and the ``position_ids`` buffer have
no place in the diffusers modules: they travel as extras.  Unlike SD 2.x every OpenCLIP block is used (the context
is the penultimate hidden state, the pooled output comes from the last one).

The SDXL refiner (only the bigG encoder, at ``conditioner.embedders.0.model.*``, aesthetic-score conditioning) and
SDXL inpainting (a 9-channel UNet) are recognised and refused by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ModelFileError
from .architecture import (
    SD_SCHEDULE,
    UNET,
    VAE,
    Architecture,
    _require,
    clip_structure,
    ldm_vae_ddconfig,
    open_clip_structure,
    released_vae,
    unet_structure,
    unsupported,
    vae_structure,
)

CLIP_L_XL = "conditioner.embedders.0.transformer.text_model."
BIG_G = "conditioner.embedders.1.model."
REFINER_BIG_G = "conditioner.embedders.0.model."
SDXL_SCALE_FACTOR = 0.13025  # sd_xl_base.yaml's scale_factor (SD 1/2: 0.18215)
TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w): each one sinusoidal embedding
HEAD_CHANNELS = 64  # sd_xl_base.yaml: num_head_channels


# ------------------------------------------------------------------------------------------ the released model


def standard_sdxl_architecture(prediction_type: str = "epsilon") -> Architecture:
    """SDXL base 1.0 at its released size: the configs of the diffusers folder, shipped so no hub is asked."""
    unet = {
        "sample_size": 128,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [320, 640, 1280],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 2,
        "cross_attention_dim": 2048,
        "attention_head_dim": [5, 10, 20],
        "use_linear_projection": True,
        "transformer_layers_per_block": [1, 2, 10],
        "norm_num_groups": 32,
        "addition_embed_type": "text_time",
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": 256,
        "projection_class_embeddings_input_dim": 2816,
    }
    vae = released_vae(1024, SDXL_SCALE_FACTOR)
    return Architecture(
        family="sdxl",
        prediction_type=prediction_type,
        unet=unet,
        vae=vae,
        text=text_config(768, 3072, 12, 12, "quick_gelu", 49407, 768),
        text_2=text_config(1280, 5120, 32, 20, "gelu", 0, 1280),
        text_blocks_in_file=12,
        schedule=dict(SD_SCHEDULE),
        scale_factor=SDXL_SCALE_FACTOR,
        prediction_source="config",
    )


def text_config(hidden: int, inner: int, layers: int, heads: int, act: str, pad: int, projection: int) -> dict:
    """CLIPTextConfig arguments (CLIP's 49,408-token vocabulary and 77 positions)."""
    return {
        "vocab_size": 49408,
        "hidden_size": hidden,
        "intermediate_size": inner,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "max_position_embeddings": 77,
        "hidden_act": act,
        "projection_dim": projection,
        "pad_token_id": pad,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
    }


def is_standard_sdxl(arch: Architecture) -> bool:
    standard = standard_sdxl_architecture()
    return (
        list(arch.unet["block_out_channels"]) == standard.unet["block_out_channels"]
        and arch.unet["cross_attention_dim"] == standard.unet["cross_attention_dim"]
        and arch.text["hidden_size"] == standard.text["hidden_size"]
        and (arch.text_2 or {}).get("hidden_size") == standard.text_2["hidden_size"]
        and list(arch.vae["block_out_channels"]) == standard.vae["block_out_channels"]
    )


# ------------------------------------------------------------------------------------------------ detection


def sgm_family(sd: dict[str, Any], source: str) -> str:
    """ "sdxl" for an SDXL base file in the sgm layout; the refiner, SDXL inpainting and other sgm models refused."""
    has_l = any(k.startswith(CLIP_L_XL) for k in sd)
    has_g = any(k.startswith(BIG_G) for k in sd)
    if any(k.startswith(REFINER_BIG_G) for k in sd) and not has_l:
        if UNET + "label_emb.0.0.weight" in sd:
            raise unsupported(
                source,
                "the SDXL refiner",
                "its only text encoder is OpenCLIP ViT-bigG at conditioner.embedders.0.model.* and its UNet takes "
                "an aesthetic score; DreamBooth trains a base model",
            )
        raise unsupported(
            source, "an SD 2.x model in the sgm layout (e.g. SD 2.1 Turbo)", "its text encoder is at embedders.0.model"
        )
    if has_l and has_g:
        conv_in = sd.get(UNET + "input_blocks.0.0.weight")
        if conv_in is not None and conv_in.ndim == 4 and int(conv_in.shape[1]) == 9:
            raise unsupported(source, "SDXL inpainting", "its UNet takes 9 input channels: latents, mask, masked image")
        return "sdxl"
    raise unsupported(
        source,
        "an sgm-layout model other than SDXL base",
        "it has conditioner.embedders.* weights but not SDXL's CLIP ViT-L and OpenCLIP ViT-bigG text encoders",
    )


def _params(yaml_config: dict[str, Any] | None) -> dict[str, Any]:
    return ((yaml_config or {}).get("model") or {}).get("params") or {}


def _sgm_prediction(params: dict[str, Any]) -> str:
    """sgm writes v-prediction as the denoiser's ``VScaling`` (there is no ``parameterization`` key)."""
    scaling = (((params.get("denoiser_config") or {}).get("params") or {}).get("scaling_config") or {}).get("target")
    return "v_prediction" if str(scaling or "").endswith("VScaling") else "epsilon"


def _embedder_version(params: dict[str, Any]) -> str | None:
    """The CLIP ViT-L folder the first embedder names (a tiny model's local folder; the WebUI reads it)."""
    models = ((params.get("conditioner_config") or {}).get("params") or {}).get("emb_models") or []
    version = ((models[0] if models else {}).get("params") or {}).get("version")
    return str(version) if version else None


def apply_sgm_yaml(arch: Architecture, yaml_config: dict[str, Any]) -> None:
    """What a sidecar yaml decides over our own metadata: epsilon vs v, and the CLIP folder it names."""
    params = _params(yaml_config)
    arch.prediction_type = _sgm_prediction(params)
    arch.prediction_source = "yaml"
    arch.clip_version = _embedder_version(params) or arch.clip_version


def sdxl_architecture(sd: dict[str, Any], source: str, yaml_config: dict[str, Any] | None = None) -> Architecture:
    """An SDXL base architecture from the tensors' names and shapes, head counts and v-prediction from the yaml."""
    unet = unet_structure(sd, source)
    vae = vae_structure(sd, source)
    text, blocks = clip_structure(sd, CLIP_L_XL, source)
    text_2, _ = open_clip_structure(sd, BIG_G, source)
    if BIG_G + "text_projection.weight" in sd and BIG_G + "text_projection" not in sd:
        layout = "linear"
    else:
        _require(sd, BIG_G + "text_projection", source)
        layout = "openclip"
    adm_in = int(_require(sd, UNET + "label_emb.0.0.weight", source).shape[1])
    time_dim, rest = divmod(adm_in - text_2["projection_dim"], TIME_IDS)
    if rest or time_dim <= 0:
        raise ModelFileError(
            f"{source}: the UNet's label_emb takes {adm_in} inputs, which is not the pooled text embedding "
            f"({text_2['projection_dim']}) plus six time-id embeddings: not an SDXL base model."
        )
    unet.update(
        addition_embed_type="text_time",
        addition_embed_type_num_heads=64,
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=adm_in,
        sample_size=128,
    )
    params = _params(yaml_config)
    network = (params.get("network_config") or {}).get("params") or {}
    heads = network.get("num_heads", -1)
    if heads not in (None, -1):
        unet["attention_head_dim"] = int(heads)
    else:
        per_head = int(network.get("num_head_channels") or HEAD_CHANNELS)
        unet["attention_head_dim"] = [max(1, c // per_head) for c in unet["block_out_channels"]]
    vae["sample_size"] = 1024
    vae["scaling_factor"] = float(params.get("scale_factor", SDXL_SCALE_FACTOR))
    clip_version = _embedder_version(params)
    if clip_version and (Path(clip_version) / "config.json").is_file():
        local = json.loads((Path(clip_version) / "config.json").read_text())
        text["num_attention_heads"] = int(local.get("num_attention_heads", text["num_attention_heads"]))
    return Architecture(
        family="sdxl",
        prediction_type=_sgm_prediction(params),
        unet=unet,
        vae=vae,
        text=text,
        text_2=text_2,
        text_blocks_in_file=blocks,
        schedule=dict(SD_SCHEDULE),
        scale_factor=vae["scaling_factor"],
        clip_version=clip_version,
        prediction_source="yaml" if yaml_config is not None else "default",
        projection_layout=layout,
    )


# ------------------------------------------------------------------------------------------------ key layout


def split_sdxl(sd: dict[str, Any], arch: Architecture, source: str) -> dict[str, dict[str, Any]]:
    """An SDXL single file -> ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2`` (diffusers names) and
    ``extras`` (every other tensor, under its original name)."""
    from .keymap import _convert, open_clip_to_transformers, unet_table, vae_table

    unet_sd, vae_sd, text_sd, big_g, extras = {}, {}, {}, {}, {}
    for key, tensor in sd.items():
        if key.startswith(UNET):
            unet_sd[key[len(UNET) :]] = tensor
        elif key.startswith(VAE):
            vae_sd[key[len(VAE) :]] = tensor
        elif key.startswith(CLIP_L_XL) and not key.endswith("position_ids"):
            text_sd["text_model." + key[len(CLIP_L_XL) :]] = tensor
        elif key.startswith(BIG_G):
            big_g[key[len(BIG_G) :]] = tensor
        else:
            extras[key] = tensor
    text_2_sd, left = open_clip_to_transformers(big_g, (arch.text_2 or {}).get("num_hidden_layers", 0))
    if arch.projection_layout == "linear":
        projection = left.pop("text_projection.weight", None)
    else:
        projection = left.pop("text_projection", None)
        projection = None if projection is None else projection.T.contiguous()  # OpenCLIP: x @ P; a Linear: x @ W.T
    if projection is None:
        raise ModelFileError(f"{source}: tensor '{BIG_G}text_projection' is missing: not a complete SDXL file.")
    text_2_sd["text_projection.weight"] = projection
    extras.update({BIG_G + k: v for k, v in left.items()})  # logit_scale
    return {
        "unet": _convert(unet_sd, unet_table(arch), UNET, to_original=False, what=source),
        "vae": _convert(vae_sd, vae_table(arch), VAE, to_original=False, what=source),
        "text_encoder": text_sd,
        "text_encoder_2": text_2_sd,
        "extras": extras,
    }


def join_sdxl_text(text_sd: dict[str, Any], text_2_sd: dict[str, Any], arch: Architecture) -> dict[str, Any]:
    """Both text encoders' weights (transformers-4 names) -> their sgm names (the projection as the file had it)."""
    from .keymap import transformers_to_open_clip

    out = {CLIP_L_XL + k.removeprefix("text_model."): v for k, v in text_sd.items()}
    rest = dict(text_2_sd)
    projection = rest.pop("text_projection.weight", None)
    if projection is None:
        raise ModelFileError("SDXL's second text encoder must be a CLIPTextModelWithProjection (no text_projection).")
    out.update({BIG_G + k: v for k, v in transformers_to_open_clip(rest).items()})
    if arch.projection_layout == "linear":
        out[BIG_G + "text_projection.weight"] = projection
    else:
        out[BIG_G + "text_projection"] = projection.T.contiguous()
    return out


# -------------------------------------------------------------------------------------------- the WebUI's yaml

BIG_G_OPEN_CLIP = "ViT-bigG-14"  # the open_clip model config sd_xl_base.yaml names for the second embedder


def open_clip_name(arch: Architecture) -> str:
    """The open_clip model-config name the yaml gives the second embedder: ``ViT-bigG-14`` at bigG's size, else a
    name spelling the sizes.  The WebUI builds that encoder with ``open_clip.create_model_and_transforms(name)``,
    which knows only registered names: a smaller encoder needs :func:`open_clip_model_config` registered there."""
    t = arch.text_2 or {}
    sizes = (t.get("hidden_size"), t.get("num_hidden_layers"), t.get("num_attention_heads"), t.get("projection_dim"))
    if sizes == (1280, 32, 20, 1280):
        return BIG_G_OPEN_CLIP
    return "sdxl-text2-w{}-l{}-h{}-p{}".format(*sizes)


def open_clip_model_config(arch: Architecture) -> dict[str, Any]:
    """open_clip's model config (``open_clip/model_configs/<open_clip_name>.json``) for this second text encoder.
    Its vision tower is the smallest open_clip builds: the WebUI deletes it right after building."""
    t = arch.text_2 or {}
    if t.get("intermediate_size") != 4 * t.get("hidden_size", 0) or t.get("hidden_act") != "gelu":
        raise ValueError("open_clip 2.20 builds text towers with a GELU MLP 4x their width only")
    return {
        "embed_dim": t["projection_dim"],
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16},
        "text_cfg": {
            "context_length": t["max_position_embeddings"],
            "vocab_size": t["vocab_size"],
            "width": t["hidden_size"],
            "heads": t["num_attention_heads"],
            "layers": t["num_hidden_layers"],
        },
    }


def sgm_yaml(arch: Architecture) -> dict[str, Any]:
    """``sd_xl_base.yaml`` (the WebUI's SDXL config, from Stability's generative-models) with this model's sizes."""
    unet, vae, text = arch.unet, arch.vae, arch.text
    channels = list(unet["block_out_channels"])
    levels = len(channels)
    depth = unet.get("transformer_layers_per_block", 1)
    depths = list(depth) if isinstance(depth, (list, tuple)) else [depth] * levels
    heads = unet["attention_head_dim"]
    head_channels = channels[0] // (heads[0] if isinstance(heads, (list, tuple)) else heads)
    attention = [2**i for i, t in enumerate(unet["down_block_types"]) if t.startswith("CrossAttn")]
    v = arch.is_v_prediction
    big_g = open_clip_name(arch) == BIG_G_OPEN_CLIP
    clip_params: dict[str, Any] = {"layer": "hidden", "layer_idx": text["num_hidden_layers"] - 1}
    if arch.clip_version:
        clip_params["version"] = arch.clip_version

    def time_embedder(key: str) -> dict[str, Any]:
        return {
            "is_trainable": False,
            "input_key": key,
            "target": "sgm.modules.encoders.modules.ConcatTimestepEmbedderND",
            "params": {"outdim": unet["addition_time_embed_dim"]},
        }

    denoiser = "sgm.modules.diffusionmodules."
    return {
        "model": {
            "target": "sgm.models.diffusion.DiffusionEngine",
            "params": {
                "scale_factor": arch.scale_factor,
                "disable_first_stage_autocast": True,
                "denoiser_config": {
                    "target": denoiser + "denoiser.DiscreteDenoiser",
                    "params": {
                        "num_idx": int(arch.schedule["timesteps"]),
                        "weighting_config": {"target": denoiser + f"denoiser_weighting.{'V' if v else 'Eps'}Weighting"},
                        "scaling_config": {"target": denoiser + f"denoiser_scaling.{'V' if v else 'Eps'}Scaling"},
                        "discretization_config": {"target": denoiser + "discretizer.LegacyDDPMDiscretization"},
                    },
                },
                "network_config": {
                    "target": denoiser + "openaimodel.UNetModel",
                    "params": {
                        "adm_in_channels": unet["projection_class_embeddings_input_dim"],
                        "num_classes": "sequential",
                        "use_checkpoint": True,
                        "in_channels": unet["in_channels"],
                        "out_channels": unet["out_channels"],
                        "model_channels": channels[0],
                        "attention_resolutions": sorted(attention, reverse=True),
                        "num_res_blocks": unet["layers_per_block"],
                        "channel_mult": [c // channels[0] for c in channels],
                        "num_head_channels": head_channels,
                        "use_spatial_transformer": True,
                        "use_linear_in_transformer": bool(unet.get("use_linear_projection", True)),
                        "transformer_depth": depths,
                        "context_dim": unet["cross_attention_dim"],
                        "spatial_transformer_attn_type": "softmax-xformers",
                        "legacy": False,
                    },
                },
                "conditioner_config": {
                    "target": "sgm.modules.GeneralConditioner",
                    "params": {
                        "emb_models": [
                            {
                                "is_trainable": False,
                                "input_key": "txt",
                                "target": "sgm.modules.encoders.modules.FrozenCLIPEmbedder",
                                "params": clip_params,
                            },
                            {
                                "is_trainable": False,
                                "input_key": "txt",
                                "target": "sgm.modules.encoders.modules.FrozenOpenCLIPEmbedder2",
                                "params": {
                                    "arch": open_clip_name(arch),
                                    # open_clip's pretrained tag; the WebUI loads no weights by it (None: none exist)
                                    "version": "laion2b_s39b_b160k" if big_g else None,
                                    "freeze": True,
                                    "layer": "penultimate",
                                    "always_return_pooled": True,
                                    "legacy": False,
                                },
                            },
                            time_embedder("original_size_as_tuple"),
                            time_embedder("crop_coords_top_left"),
                            time_embedder("target_size_as_tuple"),
                        ]
                    },
                },
                "first_stage_config": {
                    "target": "sgm.models.autoencoder.AutoencoderKLInferenceWrapper",
                    "params": {
                        "embed_dim": vae["latent_channels"],
                        "monitor": "val/rec_loss",
                        "ddconfig": {"attn_type": "vanilla-xformers", **ldm_vae_ddconfig(vae, 256)},
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
            },
        }
    }


# ------------------------------------------------------------------------------------------ diffusers folders


def folder_family(folder: Path, class_name: str, unet: dict[str, Any]) -> str | None:
    """ "sdxl" for an SDXL base diffusers folder, None for a folder without SDXL's marks; refiner, inpainting and
    other added-embedding UNets are refused by name.  Reads only what the caller read: names and the UNet config."""
    has_second = (folder / "text_encoder_2").is_dir()
    embed = unet.get("addition_embed_type")
    if not (has_second or embed or class_name.startswith("StableDiffusionXL")):
        return None
    evidence = [f"model_index.json names {class_name}"] if class_name else []
    if has_second:
        evidence.append("it has a second text encoder, text_encoder_2/")
    if embed:
        evidence.append(f"its UNet has addition_embed_type '{embed}'")
    said = ", ".join(evidence)
    if embed not in (None, "text_time"):
        raise unsupported(str(folder), "a model with another added embedding", said)
    if unet.get("requires_aesthetics_score") or (has_second and not (folder / "text_encoder").is_dir()):
        raise unsupported(str(folder), "the SDXL refiner", f"{said}, an aesthetic-score UNet or no first text encoder")
    if int(unet.get("in_channels", 4)) == 9 or "Inpaint" in class_name:
        raise unsupported(str(folder), "SDXL inpainting", f"{said}, a 9-channel UNet")
    if not (has_second and embed == "text_time"):
        raise ModelFileError(
            f"{folder}: an SDXL folder needs text_encoder_2/ and a UNet with addition_embed_type 'text_time' "
            f"({said}); the folder is incomplete."
        )
    return "sdxl"


def arch_from_sdxl_configs(
    unet: dict[str, Any], vae: dict[str, Any], text: dict[str, Any], text_2: dict[str, Any], scheduler: dict[str, Any]
) -> Architecture:
    """An SDXL Architecture from a diffusers folder's own configs (``_``-keys removed)."""
    keys = list(text_config(1, 1, 1, 1, "gelu", 0, 1))
    return Architecture(
        family="sdxl",
        prediction_type=scheduler.get("prediction_type", "epsilon"),
        unet=unet,
        vae=vae,
        text={k: text[k] for k in keys if k in text},
        text_2={k: text_2[k] for k in keys if k in text_2},
        text_blocks_in_file=int(text["num_hidden_layers"]),
        schedule={
            "timesteps": scheduler.get("num_train_timesteps", SD_SCHEDULE["timesteps"]),
            "linear_start": scheduler.get("beta_start", SD_SCHEDULE["linear_start"]),
            "linear_end": scheduler.get("beta_end", SD_SCHEDULE["linear_end"]),
        },
        scale_factor=float(vae.get("scaling_factor", SDXL_SCALE_FACTOR)),
        prediction_source="config",
    )


def model_index(diffusers_version: str) -> dict[str, Any]:
    """``model_index.json`` of an SDXL diffusers folder as we write it."""
    return {
        "_class_name": "StableDiffusionXLPipeline",
        "_diffusers_version": diffusers_version,
        "force_zeros_for_empty_prompt": True,
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
