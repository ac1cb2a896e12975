"""LoRA tools on the command line: ``merge-lora`` and ``extract-lora`` (registered by :func:`add_parsers`)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from .errors import DreamBoothError


def cmd_merge_lora(args: argparse.Namespace) -> int:
    from .network.merge import merge_lora

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise DreamBoothError(f"{out}: already exists; nothing was written (use --overwrite to replace it).")
    started = time.perf_counter()
    report = merge_lora(args.base, args.lora, out, weight=args.weight, half=args.half, overwrite=args.overwrite)
    print(report.summary())
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_extract_lora(args: argparse.Namespace) -> int:
    from .network.extract import extract_lora

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise DreamBoothError(f"{out}: already exists; nothing was written (use --overwrite to replace it).")
    started = time.perf_counter()
    report = extract_lora(
        args.tuned, args.base, out, args.rank, args.conv_rank, device=args.device, overwrite=args.overwrite
    )
    print(report.summary())
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of 1 or more, e.g. 32")
    return value


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``merge-lora`` and ``extract-lora`` to the CLI's subcommands."""
    merge = commands.add_parser(
        "merge-lora",
        help="merge a LoRA / LoHa / LoKr file into a checkpoint at a weight",
        description="Write OUT: the checkpoint BASE (a .safetensors/.ckpt file or a diffusers folder) with the LoRA "
        "added to its weights as the WebUI applies <lora:NAME:W> (each layer's delta times alpha / rank times W, "
        "in fp32). Every other tensor of BASE is kept; the metadata records the merge. A LoRA made for another "
        "model (other layers or shapes) is refused, and nothing is written.",
    )
    merge.add_argument("base", help="checkpoint to merge into: .safetensors / .ckpt file or diffusers folder")
    merge.add_argument("lora", help="LoRA, LoHa or LoKr .safetensors file (kohya / WebUI format)")
    merge.add_argument("out", help="the merged checkpoint to write (.safetensors or .ckpt)")
    merge.add_argument("--weight", type=float, default=1.0, help="the LoRA's weight, as in <lora:NAME:W> (default: 1)")
    merge.add_argument("--half", action="store_true", help="store floating-point weights as fp16 (default: fp32)")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    merge.set_defaults(func=cmd_merge_lora)

    extract = commands.add_parser(
        "extract-lora",
        help="extract a LoRA from a full fine-tune (low-rank SVD of the weight difference)",
        description="Write OUT, a kohya-format LoRA whose layers are the best rank-R approximation (SVD) of "
        "TUNED - BASE in each layer a LoRA adapts (attention and feed-forward; with --conv-rank also the resnets' "
        "and samplers' convolutions). Text-encoder layers are written when the fine-tune changed them. Prints the "
        "relative error of the approximation.",
    )
    extract.add_argument("tuned", help="the fine-tuned checkpoint (file or diffusers folder)")
    extract.add_argument("base", help="the checkpoint it was trained from")
    extract.add_argument("out", help="the LoRA file to write (.safetensors), e.g. models/Lora/NAME.safetensors")
    extract.add_argument("--rank", type=_positive_int, required=True, help="rank (dim) of the LoRA, e.g. 32")
    extract.add_argument(
        "--conv-rank", type=_positive_int, help="rank of the 3x3 convolutions (LoCon); default: no conv layers"
    )
    extract.add_argument("--device", default="cpu", help="torch device for the SVDs, e.g. cuda (default: cpu)")
    extract.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    extract.set_defaults(func=cmd_extract_lora)
