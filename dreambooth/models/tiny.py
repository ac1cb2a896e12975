"""Tiny Stable Diffusion models with random weights, built offline, for the tests and the demo.

They have the real SD architectures at a small size: GroupNorm-32-compatible channel counts and a VAE with four
levels (8x downscale, 4 latent channels), as the WebUI's ldm code and diffusers' single-file loader assume.  The
SD 1.x tiny model is laid out so the real WebUI can load it: its sidecar yaml names a local folder holding the tiny
CLIP text model and its tokenizer instead of ``openai/clip-vit-large-patch14``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..compat import quiet_library_notices
from .architecture import SD_SCALE_FACTOR, Architecture
from .components import (
    Components,
    build_scheduler,
    build_text_encoder,
    build_text_encoder_2,
    build_tokenizer_2,
    build_unet,
    build_vae,
    save_single_file,
)

LAYOUTS = ("small", "sd")


def tiny_architecture(
    family: str = "sd1", prediction_type: str | None = None, inpainting: bool = False, layout: str = "small"
) -> Architecture:
    """SD 1.x (epsilon) or SD 2.x (v-prediction by default) at a test size.

    ``layout`` "small" has one resnet per level and attention on the deeper level only.  "sd" has the real SD
    UNet's shape at two levels: two resnets per down level, attention on every level but the last.  The WebUI's
    Lora loader maps diffusers layer names to its own by that shape, so LoRA files are tested on "sd".
    """
    if family == "sdxl":
        if inpainting or layout != "small":
            raise ValueError("the tiny SDXL has one layout and no inpainting variant (SDXL inpainting is refused)")
        return tiny_sdxl_architecture(prediction_type or "epsilon")
    if family not in ("sd1", "sd2"):
        raise ValueError(f"family must be 'sd1', 'sd2' or 'sdxl', not {family!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, not {layout!r}")
    sd_shaped = layout == "sd"
    prediction = prediction_type or ("epsilon" if family == "sd1" else "v_prediction")
    text_layers = 4
    return Architecture(
        family=family,
        prediction_type=prediction,
        unet={
            "sample_size": 8,
            "in_channels": 9 if inpainting else 4,
            "out_channels": 4,
            "block_out_channels": [32, 64],
            "down_block_types": (
                ["CrossAttnDownBlock2D", "DownBlock2D"] if sd_shaped else ["DownBlock2D", "CrossAttnDownBlock2D"]
            ),
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"] if sd_shaped else ["CrossAttnUpBlock2D", "UpBlock2D"],
            "layers_per_block": 2 if sd_shaped else 1,
            "cross_attention_dim": 32,
            "attention_head_dim": 2,
            "use_linear_projection": family == "sd2",
            "transformer_layers_per_block": 1,
            "norm_num_groups": 32,
        },
        vae={
            "sample_size": 64,
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4,
            "block_out_channels": [32, 32, 32, 32],
            "layers_per_block": 1,
            "latent_channels": 4,
            "norm_num_groups": 32,
            "scaling_factor": SD_SCALE_FACTOR,
        },
        text={
            "vocab_size": 49408,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": text_layers,
            "num_attention_heads": 2,
            "max_position_embeddings": 77,
            "hidden_act": "quick_gelu" if family == "sd1" else "gelu",
            "projection_dim": 32,
            "pad_token_id": 49407 if family == "sd1" else 0,
            "bos_token_id": 49406,
            "eos_token_id": 49407,
        },
        text_blocks_in_file=text_layers if family == "sd1" else text_layers + 1,
        prediction_source="metadata",
    )


def tiny_sdxl_architecture(prediction_type: str = "epsilon") -> Architecture:
    """SDXL at a test size: the released model's shape (attention-free first level, more transformer blocks deeper,
    linear projections, the text_time added embedding) at 32/64 channels, and two text encoders of different widths
    (32 and 64, as 768 and 1280: diffusers' single-file loader tells the two CLIPs apart by their width).  The second
    one's MLP is 4x its width, as bigG's: open_clip 2.20 (the WebUI's pin) has no other MLP ratio for text towers."""
    from .sdxl import SDXL_SCALE_FACTOR, TIME_IDS, standard_sdxl_architecture, text_config

    arch = standard_sdxl_architecture(prediction_type)
    text = text_config(32, 64, 4, 1, "quick_gelu", 49407, 32)
    text_2 = text_config(64, 256, 4, 1, "gelu", 0, 64)
    time_dim = 8
    arch.unet.update(
        sample_size=8,
        block_out_channels=[32, 64, 64],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        layers_per_block=2,
        cross_attention_dim=text["hidden_size"] + text_2["hidden_size"],  # both encoders' states concatenated
        attention_head_dim=[1, 2, 2],  # 32 channels per head
        transformer_layers_per_block=[1, 1, 2],  # as SDXL's 1, 2, 10: the first level has no attention
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=TIME_IDS * time_dim + text_2["projection_dim"],
    )
    arch.vae.update(sample_size=64, block_out_channels=[32, 32, 32, 32], layers_per_block=1)
    arch.vae["scaling_factor"] = SDXL_SCALE_FACTOR
    arch.text, arch.text_2 = text, text_2
    arch.text_blocks_in_file = text["num_hidden_layers"]
    arch.prediction_source = "metadata"
    return arch


def tiny_components(arch: Architecture | None = None, seed: int = 0) -> Components:
    """Random-weight components for ``arch`` (default: tiny SD 1.x), reproducible from ``seed``."""
    import torch

    from .tokenizer import clip_tokenizer

    arch = arch or tiny_architecture()
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        unet, vae, text_encoder = build_unet(arch), build_vae(arch), build_text_encoder(arch)
        extras: dict[str, Any] = {}
        if arch.family == "sd2":
            # What an SD 2.x file holds beyond the penultimate-layer encoder: the last block and the projection.
            hidden, inner = arch.text["hidden_size"], arch.text["intermediate_size"]
            block = f"cond_stage_model.model.transformer.resblocks.{arch.text_blocks_in_file - 1}."
            shapes = {
                "ln_1.weight": (hidden,),
                "ln_1.bias": (hidden,),
                "attn.in_proj_weight": (3 * hidden, hidden),
                "attn.in_proj_bias": (3 * hidden,),
                "attn.out_proj.weight": (hidden, hidden),
                "attn.out_proj.bias": (hidden,),
                "ln_2.weight": (hidden,),
                "ln_2.bias": (hidden,),
                "mlp.c_fc.weight": (inner, hidden),
                "mlp.c_fc.bias": (inner,),
                "mlp.c_proj.weight": (hidden, inner),
                "mlp.c_proj.bias": (hidden,),
            }
            extras = {block + name: torch.randn(shape) * 0.02 for name, shape in shapes.items()}
            extras["cond_stage_model.model.text_projection"] = torch.randn(hidden, arch.text["projection_dim"])
            extras["cond_stage_model.model.logit_scale"] = torch.tensor(4.6052)
        text_encoder_2 = build_text_encoder_2(arch)
        if text_encoder_2 is not None:
            from .sdxl import BIG_G

            extras = {BIG_G + "logit_scale": torch.tensor(4.6052)}  # OpenCLIP's, kept although no module uses it
    finally:
        torch.random.set_rng_state(generator_state)
    for module in (unet, vae, text_encoder, text_encoder_2):
        if module is not None:
            module.requires_grad_(False).eval()
    return Components(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer("sd1" if arch.is_sdxl else arch.family),
        noise_scheduler=build_scheduler(arch),
        arch=arch,
        extras=extras,
        source=f"tiny-{arch.family}",
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_tokenizer_2(arch),
    )


def write_tiny_checkpoint(
    directory: str | os.PathLike,
    family: str = "sd1",
    prediction_type: str | None = None,
    inpainting: bool = False,
    suffix: str = ".safetensors",
    seed: int = 0,
    name: str | None = None,
    components: Components | None = None,
    layout: str = "small",
) -> Path:
    """Write a tiny single-file checkpoint with its sidecar yaml into ``directory``; returns the checkpoint path.

    For SD 1.x and SDXL a folder ``NAME-clip/`` beside it holds the text model and tokenizer the yaml names (SDXL:
    also ``<open_clip name>.json``, the second text encoder's open_clip model config).  ``components``
    (e.g. the demo's, whose VAE was taught to reconstruct) are written instead of new random ones.  ``layout``: see
    :func:`tiny_architecture`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    name = name or f"tiny-{family}{'-inpainting' if inpainting else ''}{'-sd' if layout == 'sd' else ''}"
    if components is None:
        components = tiny_components(tiny_architecture(family, prediction_type, inpainting, layout), seed=seed)
    arch = components.arch
    if family in ("sd1", "sdxl"):  # the CLIP ViT-L folder the yaml names (SDXL: its first embedder)
        clip_dir = (directory / f"{name}-clip").resolve()
        with quiet_library_notices():  # no "Writing model shards" progress bar in the demo's output
            components.text_encoder.save_pretrained(str(clip_dir), safe_serialization=True)
            components.tokenizer.save_pretrained(str(clip_dir))
        arch.clip_version = str(clip_dir)
        if arch.is_sdxl:  # the second embedder's open_clip config, to register where the WebUI runs (sdxl.py)
            from .sdxl import open_clip_model_config, open_clip_name

            config = json.dumps(open_clip_model_config(arch), indent=2)
            (clip_dir / f"{open_clip_name(arch)}.json").write_text(config + "\n")
    destination = directory / f"{name}{suffix}"
    save_single_file(components, destination, sidecar=True)
    return destination
