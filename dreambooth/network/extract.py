"""Extract a LoRA from a full fine-tune: a low-rank SVD of each adapted layer's weight difference (as kohya does).

For every layer kohya's LoRA adapts (:func:`.names.select_targets`; with a conv rank also the resnets and samplers),
``tuned - base`` is reshaped to 2-D (out x in*k*k), and its best rank-r approximation ``U_r S_r Vh_r`` (Eckart-Young)
is written as ``lora_up = U_r S_r`` and ``lora_down = Vh_r``: Linear (out x r, r x in); convolution down k x k
(r x in x k x k), up 1 x 1 (out x r x 1 x 1).  ``alpha`` = the layer's rank, so the WebUI's scale alpha / rank is 1
and ``<lora:NAME:1>`` adds the approximation itself.  The text encoder's layers are written only when the fine-tune
changed them by more than ``text_min_diff`` (kohya's rule: a frozen or rounding-only change is not extracted).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DreamBoothError, ModelFileError
from .files import check_network_name, write_network_file
from .metadata import version_metadata
from .names import all_layers, select_targets

TEXT_MIN_DIFF = 0.01  # kohya's MIN_DIFF: a largest text-encoder change below this is rounding, not training


@dataclass
class ExtractReport:
    """What :func:`extract_lora` wrote and how close the low-rank layers are to the real differences."""

    path: Path
    layers: int
    text_encoder: bool  # text-encoder layers written
    text_max_diff: float  # largest |tuned - base| over the text encoder's adapted layers
    relative_error: float  # ||dW - LoRA||_F / ||dW||_F over every written layer together
    worst_layer: str
    worst_error: float  # the same for the worst single layer
    left_out: float = 0.0  # ||dW||_F of the Linear / conv layers not in the file, over that of all of them

    def summary(self) -> str:
        text = (
            "text encoder included"
            if self.text_encoder
            else f"text encoder left out (largest change {self.text_max_diff:.2g} <= {TEXT_MIN_DIFF:g})"
        )
        lines = [
            f"wrote {self.path}: {self.layers} layers, {text}",
            f"relative error of the low-rank approximation: {self.relative_error:.2%} overall, "
            f"worst {self.worst_error:.2%} ({self.worst_layer})",
        ]
        if self.left_out > 0.01:
            lines.append(
                f"{self.left_out:.0%} of the weight change is in layers a LoRA of these settings does not adapt "
                "(conv_in / conv_out, the time embedding; the resnets' and samplers' unless --conv-rank is given)"
            )
        return "\n".join(lines)


def _low_rank(diff: Any, rank: int) -> tuple[Any, Any, float, float]:
    """(down, up, squared error, squared norm) of the rank-``rank`` SVD approximation of one layer's difference."""
    import torch

    out_features = diff.shape[0]
    matrix = diff.reshape(out_features, -1)
    rank = min(rank, *matrix.shape)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    up = u[:, :rank] * s[:rank]
    down = vh[:rank]
    error = float((s[rank:] ** 2).sum())
    norm = float((s**2).sum())
    if diff.dim() == 4:  # a convolution: down takes the kernel, up is 1 x 1
        down = down.reshape(rank, *diff.shape[1:])
        up = up.reshape(out_features, rank, 1, 1)
    return down.contiguous(), up.contiguous(), error, norm


def _left_out_norm(tuned: Any, base: Any, extracted: set[str], device: Any) -> float:
    """Sum of squared weight changes over the Linear / conv layers that the file will not hold."""
    import torch

    theirs = all_layers(base.unet, base.text_encoder, base.text_encoder_2)
    total = 0.0
    for name, target in all_layers(tuned.unet, tuned.text_encoder, tuned.text_encoder_2).items():
        other = theirs.get(name)
        if name in extracted or other is None or other.module.weight.shape != target.module.weight.shape:
            continue
        diff = target.module.weight.detach().to(device, torch.float32) - other.module.weight.to(device, torch.float32)
        total += float(diff.pow(2).sum())
    return total


def _targets(components: Any, conv: bool) -> list[Any]:
    """The layers a LoRA of these settings adapts, both text encoders' included (SDXL has two)."""
    return select_targets(components.unet, components.text_encoder, conv=conv, text_encoder_2=components.text_encoder_2)


def _same_model(tuned: Any, base: Any, tuned_path: Path, base_path: Path) -> None:
    if tuned.arch.family != base.arch.family:
        raise ModelFileError(
            f"{tuned_path} is {tuned.arch.name} but {base_path} is {base.arch.name}: extract needs the fine-tune "
            "and the model it was trained from."
        )


def _check_device(device: Any) -> None:
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as error:
        raise DreamBoothError(f"device {device!r}: not a torch device; use cpu or cuda.") from error
    if kind == "cuda" and not torch.cuda.is_available():
        raise DreamBoothError(f"device {device!r}: this machine has no CUDA GPU that torch can use; use cpu.")


def extract_lora(
    tuned: str | os.PathLike,
    base: str | os.PathLike,
    out: str | os.PathLike,
    rank: int,
    conv_rank: int | None = None,
    *,
    text_min_diff: float = TEXT_MIN_DIFF,
    device: Any = "cpu",
    overwrite: bool = False,
) -> ExtractReport:
    """Write ``out``, a kohya-format LoRA of rank ``rank`` (``conv_rank`` for the 3x3 convolutions of the resnets
    and samplers; None: attention and feed-forward layers only) that approximates ``tuned - base``."""
    import torch

    from ..models.components import load_components

    tuned_path, base_path, out = Path(tuned), Path(base), Path(out)
    for name, value in (("rank", rank), ("conv rank", conv_rank)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise DreamBoothError(f"{name} {value}: give a whole number of 1 or more, e.g. 32.")
    if out.suffix.lower() != ".safetensors":
        raise DreamBoothError(f"{out}: a LoRA file is written as .safetensors; end the name in .safetensors.")
    check_network_name(out)
    if out.exists() and not overwrite:
        raise DreamBoothError(f"{out}: already exists; nothing was written (choose a new name, or allow overwriting).")
    _check_device(device)
    for path, what in ((tuned_path, "the fine-tuned checkpoint"), (base_path, "the base checkpoint")):
        if not path.exists():
            raise ModelFileError(f"{path}: no such file or folder; give {what}.")
    tuned_model = load_components(tuned_path)
    base_model = load_components(base_path)
    _same_model(tuned_model, base_model, tuned_path, base_path)

    tuned_layers = {t.name: t for t in _targets(tuned_model, bool(conv_rank))}
    base_layers = {t.name: t for t in _targets(base_model, bool(conv_rank))}
    if set(tuned_layers) != set(base_layers):
        raise ModelFileError(f"{tuned_path} and {base_path} have different layers: are they the same kind of model?")
    diffs: dict[str, Any] = {}
    for name, target in tuned_layers.items():
        mine, theirs = target.module.weight, base_layers[name].module.weight
        if mine.shape != theirs.shape:
            raise ModelFileError(
                f"{tuned_path} and {base_path} differ in the shape of layer {name} ({tuple(mine.shape)} vs "
                f"{tuple(theirs.shape)}): extract needs the fine-tune and the model it was trained from."
            )
        diffs[name] = mine.detach().to(device, torch.float32) - theirs.detach().to(device, torch.float32)
    left_out = _left_out_norm(tuned_model, base_model, set(tuned_layers), device)
    text_max = max((float(d.abs().max()) for n, d in diffs.items() if tuned_layers[n].is_text), default=0.0)
    with_text = text_max > text_min_diff
    if not with_text:
        left_out += sum(float(d.pow(2).sum()) for n, d in diffs.items() if tuned_layers[n].is_text)
        diffs = {n: d for n, d in diffs.items() if not tuned_layers[n].is_text}
    if not any(bool(d.any()) for d in diffs.values()):
        hint = " (it changed only other layers; --conv-rank adds the resnets' convolutions)" if left_out else ""
        raise DreamBoothError(
            f"{tuned_path} has the same weights as {base_path} in every layer a LoRA adapts{hint}: there is no LoRA "
            "to extract."
        )

    tensors: dict[str, Any] = {}
    total_error = total_norm = 0.0
    worst = ("", 0.0)
    for name, diff in diffs.items():
        layer_rank = conv_rank if tuned_layers[name].conv else rank
        down, up, error, norm = _low_rank(diff, layer_rank)
        tensors[f"{name}.lora_down.weight"] = down.cpu()
        tensors[f"{name}.lora_up.weight"] = up.cpu()
        tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        total_error, total_norm = total_error + error, total_norm + norm
        layer_error = math.sqrt(error / norm) if norm else 0.0
        if layer_error >= worst[1]:
            worst = (name, layer_error)
    relative = math.sqrt(total_error / total_norm) if total_norm else 0.0
    left_out = math.sqrt(left_out / (left_out + total_norm)) if left_out else 0.0
    arch = base_model.arch
    conv_args = {"conv_dim": str(conv_rank), "conv_alpha": str(float(conv_rank))} if conv_rank else {}
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(float(rank)),
        "ss_network_args": json.dumps(conv_args),
        **version_metadata(arch),
        "ss_sd_model_name": base_path.name,
        "ss_output_name": out.stem,
        "ss_training_comment": f"extracted from {tuned_path.name} minus {base_path.name} "
        f"(relative error {relative:.2%})",
        "dreambooth.extracted": json.dumps(
            {
                "tuned": tuned_path.name,
                "base": base_path.name,
                "rank": rank,
                "conv_rank": conv_rank,
                "text_encoder": with_text,
                "relative_error": relative,
            }
        ),
    }
    written = write_network_file(out, tensors, metadata)
    return ExtractReport(written, len(diffs), with_text, text_max, relative, *worst, left_out)
