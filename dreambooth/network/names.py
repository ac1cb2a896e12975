"""Which layers a LoRA / LoHa / LoKr adapts, and the names its file gives them (kohya's, which the WebUI reads).

A name is ``PREFIX_`` + the module's path in the diffusers / transformers model with every ``.`` replaced by ``_``:
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` and
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.  The text encoder's path always carries ``text_model.``:
transformers 5 dropped it from ``CLIPTextModel``'s module paths, but the WebUI's loader only maps names with it.

The layers are kohya sd-scripts' (what users and the WebUI expect): every ``Linear`` and ``Conv2d`` inside the UNet's
``Transformer2DModel`` blocks (attention, feed-forward, ``proj_in`` / ``proj_out``) and inside the text encoder's
attention and MLP blocks; with a conv rank (LoCon), also those inside the resnets, down- and upsamplers.  A 3x3
convolution takes the conv rank; a Linear or 1x1 convolution the network rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

UNET_PREFIX = "lora_unet"
TEXT_PREFIX = "lora_te"
TEXT_MODEL = "text_model."  # transformers 4's CLIPTextModel path prefix, kept in every name

UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPMLP",)  # plus every CLIP*Attention class (CLIPAttention, CLIPSdpaAttention, ... by version)


@dataclass(frozen=True)
class Target:
    """One adapted layer: its file name, the component it lives in, its path there, and the layer itself."""

    name: str  # kohya name, e.g. lora_unet_mid_block_attentions_0_proj_in
    component: str  # "unet" or "text_encoder"
    path: str  # module path inside the component (as that library version names it)
    module: Any  # the torch.nn.Linear / Conv2d
    conv: bool  # a k x k convolution with k > 1: takes the conv rank

    @property
    def is_text(self) -> bool:
        return self.component == "text_encoder"


def kohya_name(component: str, path: str) -> str:
    """The file name of the layer at ``path`` in ``component`` ("unet" / "text_encoder")."""
    if component == "unet":
        return f"{UNET_PREFIX}_{path.replace('.', '_')}"
    if component == "text_encoder":
        if not path.startswith(TEXT_MODEL):
            path = TEXT_MODEL + path
        return f"{TEXT_PREFIX}_{path.replace('.', '_')}"
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


def select_targets(unet: Any, text_encoder: Any | None, *, conv: bool) -> list[Target]:
    """The layers kohya's LoRA adapts: the UNet's transformer blocks (and with ``conv`` its resnets and samplers),
    and the text encoder's attention and MLP blocks when ``text_encoder`` is given."""
    blocks = UNET_BLOCKS + (UNET_CONV_BLOCKS if conv else ())
    targets = [
        Target(kohya_name("unet", path), "unet", path, layer, _is_kxk(layer))
        for path, layer in _layers_in_blocks(unet, lambda m: type(m).__name__ in blocks)
    ]
    if text_encoder is not None:
        targets += [
            Target(kohya_name("text_encoder", path), "text_encoder", path, layer, False)
            for path, layer in _layers_in_blocks(text_encoder, _is_text_block)
        ]
    return targets


def all_layers(unet: Any, text_encoder: Any) -> dict[str, Target]:
    """Every Linear / Conv2d of the UNet and the text encoder by kohya name: what a LoRA file's keys may name
    (files from other trainers also adapt ``conv_in``, ``time_embedding`` and more)."""
    layers = {}
    for component, model in (("unet", unet), ("text_encoder", text_encoder)):
        for path, layer in model.named_modules():
            if path and _adaptable(layer):
                name = kohya_name(component, path)
                layers[name] = Target(name, component, path, layer, _is_kxk(layer))
    return layers


def split_key(key: str) -> tuple[str, str]:
    """A file key's layer name and suffix: only the first dot separates them (as the WebUI's loader reads them),
    e.g. ``lora_unet_conv_in.lora_down.weight`` -> (``lora_unet_conv_in``, ``lora_down.weight``)."""
    name, _, suffix = key.partition(".")
    return name, suffix
