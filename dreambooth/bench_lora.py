"""LoRA rows of ``python -m dreambooth bench --training-method lora``, beside diffusers' train_dreambooth_lora.py.

Both sides get what the script can be told: the rank (``--network-rank``), alpha = rank (the script's only choice),
one learning rate for the UNet's and the text encoder's adapters (our ``network_unet_lr`` default), no dropout, fp32,
and the same model, images, resolution, batch and steps (``bench_reference`` lists what the script cannot be told).
Which layers our adapter adapts is ``--network-targets``: ``kohya`` (our trainer's own choice, what a user gets:
the attention projections, ``proj_in`` / ``proj_out`` and the feed-forward layers of every transformer block; the
text encoder's attention and MLP) or ``diffusers`` (only the layers the script adapts: ``to_q``, ``to_k``, ``to_v``,
``to_out.0`` in the UNet, ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` in the text encoder), so that both sides
train the same parameters; every row's ``params`` column shows how many.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
from typing import Any

LORA_RANK = 16  # --network-rank's default: our network_rank default (diffusers' script defaults to 4)
LORA_MODES = ("default", "naive")  # no floor: bare adapter steps would need the adapter outside the trainer
TARGETS = ("kohya", "diffusers")
# train_dreambooth_lora.py v0.40.0's LoraConfig target_modules (peft matches them as name suffixes); its
# "add_k_proj", "add_v_proj" name no layer of an SD 1.x / 2.x UNet
DIFFUSERS_UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
DIFFUSERS_TEXT_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj")


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--training-method",
        choices=["full", "lora"],
        default="full",
        help="what is trained: the full model (default) or a LoRA (modes default and naive)",
    )
    parser.add_argument(
        "--network-rank",
        type=int,
        default=LORA_RANK,
        help=f"LoRA rank, alpha = rank (default {LORA_RANK}; only with --training-method lora)",
    )
    parser.add_argument(
        "--network-targets",
        choices=TARGETS,
        default="kohya",
        help="layers our LoRA adapts: kohya (our trainer's choice, default) or diffusers (those "
        "train_dreambooth_lora.py adapts: the attention projections only)",
    )


def method_config(args: argparse.Namespace) -> dict[str, Any]:
    """The training method's part of every bench configuration: {} for full fine-tuning (as before LoRA existed),
    else {method, rank, targets, learning_rate} (our trainer's default UNet adapter rate, given to both sides)."""
    if args.training_method == "full":
        return {}
    from .settings import Settings

    wrong = [mode for mode in args.modes or [] if mode not in LORA_MODES]
    if wrong:
        raise SystemExit(
            f"bench --training-method lora: --modes {' '.join(wrong)} do not exist for LoRA; use "
            f"--modes {' '.join(LORA_MODES)}"
        )
    if args.network_rank < 1:
        raise SystemExit(f"bench: --network-rank must be 1 or more, not {args.network_rank}")
    return {
        "method": "lora",
        "rank": args.network_rank,
        "targets": args.network_targets,
        "learning_rate": Settings().network_unet_lr,
    }


def check_mode(spec: dict[str, Any]) -> None:
    if spec.get("method", "full") == "lora" and spec["mode"] not in LORA_MODES:
        raise ValueError(f"bench mode {spec['mode']!r} does not exist for LoRA (only {', '.join(LORA_MODES)})")


def lora_settings(spec: dict[str, Any]) -> dict[str, Any]:
    """Our trainer's settings for a bench row: {} for full fine-tuning; for LoRA what diffusers'
    train_dreambooth_lora.py is given (rank, one learning rate, text-encoder adapters when the text encoder is
    trained) and alpha = rank, the script's only choice."""
    if spec.get("method", "full") != "lora":
        return {}
    rank, learning_rate = spec["rank"], spec["learning_rate"]
    return {
        "training_method": "lora",
        "network_rank": rank,
        "network_alpha": float(rank),
        "network_dropout": 0.0,
        "network_conv_rank": 0,
        "network_unet_lr": learning_rate,
        "network_text_encoder_lr": learning_rate,
        "network_train_text_encoder": spec["train_text"],
        "train_text_encoder": False,  # the text encoder's own weights stay frozen; its adapters train or not
    }


def is_diffusers_target(target: Any) -> bool:
    """Whether diffusers' train_dreambooth_lora.py adapts this layer (a :class:`~.network.names.Target`)."""
    layers = DIFFUSERS_UNET_LAYERS if target.component == "unet" else DIFFUSERS_TEXT_LAYERS  # SDXL: 2 encoders
    return any(target.path == layer or target.path.endswith("." + layer) for layer in layers)


@contextlib.contextmanager
def lora_targets(spec: dict[str, Any]) -> Iterator[None]:
    """While inside, with ``targets`` "diffusers": our trainer's adapter adapts only the layers diffusers' script
    adapts (the adapter module's choice of layers is narrowed, and put back on leaving).  Otherwise nothing."""
    if spec.get("method", "full") != "lora" or spec.get("targets", "kohya") == "kohya":
        yield
        return
    from .network import adapter

    choose = adapter.select_targets

    def diffusers_layers(*modules: Any, **options: Any) -> list[Any]:  # SDXL: a second text encoder among them
        return [target for target in choose(*modules, **options) if is_diffusers_target(target)]

    adapter.select_targets = diffusers_layers
    try:
        yield
    finally:
        adapter.select_targets = choose


def describe_method(row: dict[str, Any]) -> str:
    """What a row trained, for the table's header line: "full fine-tune", "LoRA rank 16, alpha 16 (kohya layers)"."""
    method = row.get("method", "full")
    if method == "full":
        return "full fine-tune"
    layers = f" ({row['targets']} layers)" if row.get("targets") else ""
    return f"{'LoRA' if method == 'lora' else method} rank {row['rank']}, alpha {row['rank']}{layers}"
