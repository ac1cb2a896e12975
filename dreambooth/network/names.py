"""Which layers a LoRA / LoHa / LoKr adapts, and the names its file gives them (kohya's, which the WebUI reads).

A name is ``PREFIX_`` + the module's path in the diffusers / transformers model with every ``.`` replaced by ``_``:
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` and
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.  The text encoder's path always carries ``text_model.``:
transformers 5 dropped it from ``CLIPTextModel``'s module paths, but the WebUI's loader only maps names with it.

SDXL (a UNet with the ``text_time`` added embedding) has the names kohya's SDXL trainer writes and the WebUI matches
for SDXL: the UNet's layers by their *original* (sgm) path,
``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` (the diffusers -> sgm path is the checkpoint
converter's table, models/keymap.py ``unet_table``), and its two text
encoders as ``lora_te1_text_model_...`` (CLIP ViT-L) and ``lora_te2_text_model_...`` (OpenCLIP ViT-bigG, which the
WebUI applies through OpenCLIP's fused ``in_proj``: it needs q, k, v and out_proj of a layer together, which these
layers always give).

The layers are kohya sd-scripts' (what users and the WebUI expect): every ``Linear`` and ``Conv2d`` inside the UNet's
``Transformer2DModel`` blocks (attention, feed-forward, ``proj_in`` / ``proj_out``) and inside the text encoders'
attention and MLP blocks; with a conv rank (LoCon), also those inside the resnets, down- and upsamplers.  A 3x3
convolution takes the conv rank; a Linear or 1x1 convolution the network rank.  ``Target.path`` is always the
module's path in the diffusers / transformers model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

UNET_PREFIX = "lora_unet"
TEXT_PREFIX = "lora_te"
SDXL_TEXT_PREFIXES = {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}  # CLIP ViT-L, OpenCLIP ViT-bigG
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2")
TEXT_MODEL = "text_model."  # transformers 4's CLIPTextModel path prefix, kept in every name

UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPMLP",)  # plus every CLIP*Attention class (CLIPAttention, CLIPSdpaAttention, ... by version)


@dataclass(frozen=True)
class Target:
    """One adapted layer: its file name, the component it lives in, its path there, and the layer itself."""

    name: str  # kohya name, e.g. lora_unet_mid_block_attentions_0_proj_in
    component: str  # "unet", "text_encoder" or (SDXL) "text_encoder_2"
    path: str  # module path inside the component (as that library version names it)
    module: Any  # the torch.nn.Linear / Conv2d
    conv: bool  # a k x k convolution with k > 1: takes the conv rank

    @property
    def is_text(self) -> bool:
        return self.component in TEXT_COMPONENTS


def is_sdxl_unet(unet: Any) -> bool:
    """An SDXL UNet (diffusers' ``text_time`` added embedding: pooled text and time ids), whose LoRA names are sgm's."""
    return getattr(getattr(unet, "config", None), "addition_embed_type", None) == "text_time"


def sdxl_unet_table(unet: Any) -> list[tuple[str, str, str]]:
    """The diffusers -> sgm prefix table of this SDXL UNet (the one its checkpoint keys are converted with)."""
    import types

    from ..models.keymap import unet_table

    return unet_table(types.SimpleNamespace(unet=dict(unet.config)))


def kohya_name(component: str, path: str, sdxl_table: list[tuple[str, str, str]] | None = None) -> str | None:
    """The file name of the layer at ``path`` (its diffusers / transformers module path) in ``component``
    ("unet" / "text_encoder" / "text_encoder_2").  ``sdxl_table`` (:func:`sdxl_unet_table`): the model is SDXL,
    named as kohya's SDXL trainer and the WebUI name it; None for a UNet path the sgm layout has no place for."""
    if component == "unet":
        if sdxl_table is not None:
            from ..models.keymap import original_module_path

            path = original_module_path(path, sdxl_table)
            if path is None:
                return None
        return f"{UNET_PREFIX}_{path.replace('.', '_')}"
    if component in TEXT_COMPONENTS:
        if sdxl_table is None and component == "text_encoder_2":
            raise ValueError("a second text encoder is SDXL's: give the SDXL UNet's table")
        prefix = TEXT_PREFIX if sdxl_table is None else SDXL_TEXT_PREFIXES[component]
        if path.startswith(("embeddings.", "encoder.", "final_layer_norm.")):  # transformers 5's CLIPTextModel
            path = TEXT_MODEL + path
        return f"{prefix}_{path.replace('.', '_')}"
    raise ValueError(f"no LoRA names for the component {component!r}")


def _is_text_block(module: Any) -> bool:
    name = type(module).__name__
    return name in TEXT_BLOCKS or (name.startswith("CLIP") and name.endswith("Attention"))


def _adaptable(module: Any) -> bool:
    import torch

    return type(module) in (torch.nn.Linear, torch.nn.Conv2d)  # exact types, as kohya (and the WebUI's loader)


def _is_kxk(module: Any) -> bool:
    import torch

    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def _layers_in_blocks(model: Any, block_test: Any) -> Iterator[tuple[str, Any]]:
    """(path, layer) for each Linear / Conv2d inside a block that ``block_test`` accepts, once each, in order."""
    seen: set[str] = set()
    for block_path, block in model.named_modules():
        if not block_test(block):
            continue
        for child_path, child in block.named_modules():
            if child_path and _adaptable(child):
                path = f"{block_path}.{child_path}" if block_path else child_path
                if path not in seen:
                    seen.add(path)
                    yield path, child


def _table(unet: Any) -> list[tuple[str, str, str]] | None:
    return sdxl_unet_table(unet) if is_sdxl_unet(unet) else None


def select_targets(
    unet: Any, text_encoder: Any | None, *, conv: bool, text_encoder_2: Any | None = None
) -> list[Target]:
    """The layers kohya's LoRA adapts: the UNet's transformer blocks (and with ``conv`` its resnets and samplers),
    and each given text encoder's attention and MLP blocks (``text_encoder_2``: SDXL's second)."""
    table = _table(unet)
    blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if conv else ())
    targets = []
    for path, layer in _layers_in_blocks(unet, lambda m: type(m).__name__ in blocks):
        name = kohya_name("unet", path, table)
        if name is None:  # every block layer of a diffusers SDXL UNet has an sgm path: a new diffusers layout
            raise ValueError(f"the UNet layer {path} has no place in the SDXL checkpoint layout")
        targets.append(Target(name, "unet", path, layer, _is_kxk(layer)))
    for component, model in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is not None:
            targets += [
                Target(kohya_name(component, path, table), component, path, layer, False)
                for path, layer in _layers_in_blocks(model, _is_text_block)
            ]
    return targets


def all_layers(unet: Any, text_encoder: Any, text_encoder_2: Any | None = None) -> dict[str, Target]:
    """Every Linear / Conv2d of the UNet and the text encoder(s) by kohya name: what a LoRA file's keys may name
    (files from other trainers also adapt ``conv_in``, ``time_embedding`` and more)."""
    table = _table(unet)
    layers = {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is None:
            continue
        for path, layer in model.named_modules():
            if path and _adaptable(layer):
                name = kohya_name(component, path, table)
                if name is not None:
                    layers[name] = Target(name, component, path, layer, _is_kxk(layer))
    return layers


def split_key(key: str) -> tuple[str, str]:
    """A file key's layer name and suffix: only the first dot separates them (as the WebUI's loader reads them),
    e.g. ``lora_unet_conv_in.lora_down.weight`` -> (``lora_unet_conv_in``, ``lora_down.weight``)."""
    name, _, suffix = key.partition(".")
    return name, suffix
