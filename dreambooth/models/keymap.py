"""Tensor names of the original single-file layout (ldm / the WebUI) <-> diffusers / transformers components.

Each network's mapping is a table of ``(diffusers prefix, original prefix, kind)`` built from the structure in the
:class:`~dreambooth.models.architecture.Architecture`, so the same table converts in both directions and any number
of levels / blocks is handled.  ``kind`` selects the renames inside a prefix (ResNet blocks are named differently in
the two worlds).  The OpenCLIP text encoder of SD 2.x fuses q/k/v into one ``in_proj`` tensor: handled apart.
"""

from __future__ import annotations

from typing import Any

from ..errors import ModelFileError
from .architecture import CLIP_L, OPEN_CLIP, UNET, VAE, Architecture

# Renames inside a block, (diffusers, original).
UNET_RESNET = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
]
VAE_RESNET = [("conv_shortcut.", "nin_shortcut.")]
VAE_ATTENTION = [
    ("group_norm.", "norm."),
    ("to_q.", "q."),
    ("to_k.", "k."),
    ("to_v.", "v."),
    ("to_out.0.", "proj_out."),
]
RENAMES = {"plain": [], "unet_resnet": UNET_RESNET, "vae_resnet": VAE_RESNET, "vae_attention": VAE_ATTENTION}

Table = list[tuple[str, str, str]]


def unet_table(arch: Architecture) -> Table:
    """(diffusers, original) prefixes of every UNet tensor group, original names without ``model.diffusion_model.``"""
    cfg = arch.unet
    n = cfg["layers_per_block"]
    levels = len(cfg["block_out_channels"])
    down_attention = [t.startswith("CrossAttn") for t in cfg["down_block_types"]]
    up_attention = [t.startswith("CrossAttn") for t in cfg["up_block_types"]]
    table: Table = [
        ("time_embedding.linear_1.", "time_embed.0.", "plain"),
        ("time_embedding.linear_2.", "time_embed.2.", "plain"),
        ("conv_in.", "input_blocks.0.0.", "plain"),
        ("conv_norm_out.", "out.0.", "plain"),
        ("conv_out.", "out.2.", "plain"),
        ("mid_block.resnets.0.", "middle_block.0.", "unet_resnet"),
        ("mid_block.attentions.0.", "middle_block.1.", "plain"),
        ("mid_block.resnets.1.", "middle_block.2.", "unet_resnet"),
    ]
    if cfg.get("addition_embed_type") == "text_time":  # SDXL: the pooled text + time ids embedding
        table += [
            ("add_embedding.linear_1.", "label_emb.0.0.", "plain"),
            ("add_embedding.linear_2.", "label_emb.0.2.", "plain"),
        ]
    for i in range(levels):
        for j in range(n):
            block = 1 + i * (n + 1) + j
            table.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{block}.0.", "unet_resnet"))
            if down_attention[i]:
                table.append((f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{block}.1.", "plain"))
        if i < levels - 1:
            table.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{(i + 1) * (n + 1)}.0.op.", "plain"))
        for j in range(n + 1):
            block = i * (n + 1) + j
            table.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{block}.0.", "unet_resnet"))
            if up_attention[i]:
                table.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{block}.1.", "plain"))
        if i < levels - 1:
            slot = 2 if up_attention[i] else 1
            table.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{i * (n + 1) + n}.{slot}.", "plain"))
    return table


def vae_table(arch: Architecture) -> Table:
    cfg = arch.vae
    n = cfg["layers_per_block"]
    levels = len(cfg["block_out_channels"])
    table: Table = [
        ("encoder.conv_norm_out.", "encoder.norm_out.", "plain"),
        ("decoder.conv_norm_out.", "decoder.norm_out.", "plain"),
        ("encoder.conv_in.", "encoder.conv_in.", "plain"),
        ("encoder.conv_out.", "encoder.conv_out.", "plain"),
        ("decoder.conv_in.", "decoder.conv_in.", "plain"),
        ("decoder.conv_out.", "decoder.conv_out.", "plain"),
        ("quant_conv.", "quant_conv.", "plain"),
        ("post_quant_conv.", "post_quant_conv.", "plain"),
    ]
    for part in ("encoder", "decoder"):
        table.append((f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", "vae_attention"))
        for k in range(2):
            table.append((f"{part}.mid_block.resnets.{k}.", f"{part}.mid.block_{k + 1}.", "vae_resnet"))
    for i in range(levels):
        for j in range(n):
            table.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", "vae_resnet"))
        if i < levels - 1:
            table.append((f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.", "plain"))
        original_level = levels - 1 - i
        for j in range(n + 1):
            table.append(
                (
                    f"decoder.up_blocks.{i}.resnets.{j}.",
                    f"decoder.up.{original_level}.block.{j}.",
                    "vae_resnet",
                )
            )
        if i < levels - 1:
            table.append((f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{original_level}.upsample.", "plain"))
    return table


def _translate(key: str, table: Table, to_original: bool) -> tuple[str, str] | None:
    """Translate one name by the longest matching prefix; returns (new name, kind)."""
    best = None
    for diffusers_prefix, original_prefix, kind in table:
        source, target = (diffusers_prefix, original_prefix) if to_original else (original_prefix, diffusers_prefix)
        if key.startswith(source) and (best is None or len(source) > len(best[0])):
            best = (source, target, kind)
    if best is None:
        return None
    source, target, kind = best
    rest = key[len(source) :]
    for diffusers_name, original_name in RENAMES[kind]:
        a, b = (diffusers_name, original_name) if to_original else (original_name, diffusers_name)
        if rest.startswith(a):
            rest = b + rest[len(a) :]
            break
    return target + rest, kind


def original_module_path(path: str, table: Table) -> str | None:
    """The original (ldm / sgm) path of the module at the diffusers ``path`` by ``table`` (None: no place there),
    e.g. ``down_blocks.1.attentions.0.proj_in`` -> ``input_blocks.4.1.proj_in`` (the LoRA names of SDXL)."""
    translated = _translate(path + ".", table, to_original=True)
    return None if translated is None else translated[0].removesuffix(".")


def _reshape_vae_attention(name: str, kind: str, tensor: Any, to_original: bool) -> Any:
    """ldm's VAE attention uses 1x1 convolutions where diffusers uses linear layers."""
    if kind != "vae_attention":
        return tensor
    if to_original and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    if not to_original and tensor.ndim == 4:
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    return tensor


def _convert(sd: dict[str, Any], table: Table, prefix: str, to_original: bool, what: str) -> dict[str, Any]:
    out = {}
    for key, tensor in sd.items():
        translated = _translate(key, table, to_original)
        if translated is None:
            raise ModelFileError(f"{what}: tensor '{prefix if not to_original else ''}{key}' has no known place.")
        name, kind = translated
        out[(prefix + name) if to_original else name] = _reshape_vae_attention(name, kind, tensor, to_original)
    return out


# ------------------------------------------------------------------------------------------------ text encoders

_OPEN_CLIP_LAYER = [
    ("layer_norm1.", "ln_1."),
    ("layer_norm2.", "ln_2."),
    ("self_attn.out_proj.", "attn.out_proj."),
    ("mlp.fc1.", "mlp.c_fc."),
    ("mlp.fc2.", "mlp.c_proj."),
]


def open_clip_to_transformers(sd: dict[str, Any], layers: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """OpenCLIP text weights (names without ``cond_stage_model.model.``) -> CLIPTextModel weights.

    Returns (converted, left over): blocks past ``layers`` and ``text_projection`` / ``logit_scale`` are left over,
    so that a file written back keeps them although the trained encoder does not use them.
    """
    out, left = {}, {}
    for key, tensor in sd.items():
        if key == "token_embedding.weight":
            out["text_model.embeddings.token_embedding.weight"] = tensor
        elif key == "positional_embedding":
            out["text_model.embeddings.position_embedding.weight"] = tensor
        elif key.startswith("ln_final."):
            out["text_model.final_layer_norm." + key[len("ln_final.") :]] = tensor
        elif key.startswith("transformer.resblocks."):
            index_text, rest = key[len("transformer.resblocks.") :].split(".", 1)
            index = int(index_text)
            if index >= layers:
                left[key] = tensor
                continue
            target = f"text_model.encoder.layers.{index}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_") :]  # "weight" or "bias"
                for name, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0)):
                    out[f"{target}self_attn.{name}.{kind}"] = part.clone()
                continue
            for ours, theirs in _OPEN_CLIP_LAYER:
                if rest.startswith(theirs):
                    out[target + ours + rest[len(theirs) :]] = tensor
                    break
            else:
                left[key] = tensor
        else:
            left[key] = tensor
    return out, left


def transformers_to_open_clip(sd: dict[str, Any]) -> dict[str, Any]:
    """CLIPTextModel weights (``text_model.`` names) -> OpenCLIP names without ``cond_stage_model.model.``."""
    import torch

    out = {}
    qkv: dict[tuple[str, str], dict[str, Any]] = {}
    for key, tensor in sd.items():
        name = key.removeprefix("text_model.")
        if name == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = tensor
        elif name == "embeddings.position_embedding.weight":
            out["positional_embedding"] = tensor
        elif name.startswith("final_layer_norm."):
            out["ln_final." + name[len("final_layer_norm.") :]] = tensor
        elif name.startswith("encoder.layers."):
            index, rest = name[len("encoder.layers.") :].split(".", 1)
            target = f"transformer.resblocks.{index}."
            if rest.startswith(("self_attn.q_proj.", "self_attn.k_proj.", "self_attn.v_proj.")):
                part, kind = rest[len("self_attn.") :].split(".", 1)
                qkv.setdefault((target, kind), {})[part] = tensor
                continue
            for ours, theirs in _OPEN_CLIP_LAYER:
                if rest.startswith(ours):
                    out[target + theirs + rest[len(ours) :]] = tensor
                    break
            else:
                raise ModelFileError(f"text encoder tensor '{key}' has no place in the OpenCLIP layout")
        else:
            raise ModelFileError(f"text encoder tensor '{key}' has no place in the OpenCLIP layout")
    for (target, kind), parts in qkv.items():
        out[f"{target}attn.in_proj_{kind}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


# ------------------------------------------------------------------------------------------------- whole files


def split_original(sd: dict[str, Any], arch: Architecture, source: str) -> dict[str, dict[str, Any]]:
    """Original single-file state dict -> ``{"unet", "vae", "text_encoder", "extras"}`` (diffusers names), plus
    ``"text_encoder_2"`` for SDXL (models/sdxl.py).

    ``extras`` holds every tensor that belongs to no trained component (EMA weights, ldm's noise-schedule
    buffers, the last OpenCLIP block, ...), under its original name, so that writing back loses nothing.
    """
    if arch.family == "sdxl":
        from .sdxl import split_sdxl

        return split_sdxl(sd, arch, source)
    unet_sd, vae_sd, text_sd, extras = {}, {}, {}, {}
    for key, tensor in sd.items():
        if key.startswith(UNET):
            unet_sd[key[len(UNET) :]] = tensor
        elif key.startswith(VAE):
            vae_sd[key[len(VAE) :]] = tensor
        elif arch.family == "sd1" and key.startswith(CLIP_L) and not key.endswith("position_ids"):
            text_sd["text_model." + key[len(CLIP_L) :]] = tensor
        elif arch.family == "sd2" and key.startswith(OPEN_CLIP):
            text_sd[key[len(OPEN_CLIP) :]] = tensor
        else:
            extras[key] = tensor
    if arch.family == "sd2":
        text_sd, left = open_clip_to_transformers(text_sd, arch.text["num_hidden_layers"])
        extras.update({OPEN_CLIP + k: v for k, v in left.items()})
    return {
        "unet": _convert(unet_sd, unet_table(arch), UNET, to_original=False, what=source),
        "vae": _convert(vae_sd, vae_table(arch), VAE, to_original=False, what=source),
        "text_encoder": text_sd,
        "extras": extras,
    }


def join_original(
    unet_sd: dict[str, Any],
    vae_sd: dict[str, Any],
    text_sd: dict[str, Any],
    arch: Architecture,
    extras: dict[str, Any] | None = None,
    text_2_sd: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Component state dicts (diffusers / transformers-4 names) -> one original single-file state dict.

    ``text_2_sd``: SDXL's second text encoder (``CLIPTextModelWithProjection``), required for that family.
    """
    out = _convert(unet_sd, unet_table(arch), UNET, to_original=True, what="UNet")
    out.update(_convert(vae_sd, vae_table(arch), VAE, to_original=True, what="VAE"))
    if arch.family == "sdxl":
        from .sdxl import join_sdxl_text

        out.update(join_sdxl_text(text_sd, text_2_sd or {}, arch))
    elif arch.family == "sd1":
        out.update({CLIP_L + k.removeprefix("text_model."): v for k, v in text_sd.items()})
    else:
        out.update({OPEN_CLIP + k: v for k, v in transformers_to_open_clip(text_sd).items()})
    if extras:
        out.update({k: v for k, v in extras.items() if k not in out})
    return out
