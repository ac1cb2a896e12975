"""Command line: ``python -m dreambooth COMMAND ...``.

Commands:
  convert SRC DST   single file <-> diffusers folder (direction from SRC/DST), or single file -> single file
  info PATH         which Stable Diffusion a checkpoint or folder is
  demo              build the tiny model, convert it both ways, check the round trip, make a sample image
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .errors import DreamBoothError

CHECKPOINT_SUFFIXES = {".safetensors", ".ckpt"}


def _is_single_file(path: Path) -> bool:
    return path.suffix.lower() in CHECKPOINT_SUFFIXES


def cmd_convert(args: argparse.Namespace) -> int:
    from .models.components import load_components, save_diffusers_folder, save_single_file

    source, destination = Path(args.src), Path(args.dst)
    if not source.exists():
        raise DreamBoothError(f"{source}: no such file or folder.")
    if destination.exists() and not (args.overwrite and _is_single_file(destination)):
        hint = " (use --overwrite to replace a file)" if _is_single_file(destination) else ""
        raise DreamBoothError(f"{destination}: already exists; nothing was written{hint}.")
    if source.is_dir() and not _is_single_file(destination):
        raise DreamBoothError(
            f"{destination}: converting a diffusers folder needs a single-file destination ending in "
            ".safetensors or .ckpt."
        )
    started = time.perf_counter()
    components = load_components(source, original_config=args.original_config)
    print(f"loaded {source} ({components.arch.name})")
    if _is_single_file(destination):
        written = save_single_file(components, destination, half=args.half)
    else:
        written = [save_diffusers_folder(components, destination, half=args.half)]
    for path in written:
        print(f"wrote {path}")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .models.components import load_components

    components = load_components(Path(args.path), original_config=args.original_config)
    arch = components.arch
    print(f"{args.path}: {arch.name}")
    print(f"  prediction type: {arch.prediction_type} (from {arch.prediction_source})")
    print(f"  UNet channels {arch.unet['block_out_channels']}, context {arch.unet['cross_attention_dim']}")
    print(f"  text encoder: {arch.text['num_hidden_layers']} layers, hidden {arch.text['hidden_size']}")
    print(f"  tensors kept as they are: {len(components.extras)}")
    print(f"  needs a sidecar .yaml in the WebUI: {'yes' if arch.needs_sidecar_yaml else 'no'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m dreambooth", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    convert = commands.add_parser(
        "convert",
        help="convert between an original single file and a diffusers folder",
        description="SRC a .safetensors/.ckpt file and DST a folder: single file -> diffusers. SRC a diffusers "
        "folder and DST a .safetensors/.ckpt file: diffusers -> single file (plus NAME.yaml when the WebUI needs "
        "one). Both files: re-save (e.g. .ckpt -> .safetensors, or --half).",
    )
    convert.add_argument("src", help="source checkpoint file or diffusers folder")
    convert.add_argument("dst", help="destination folder, or file ending in .safetensors or .ckpt")
    convert.add_argument("--half", action="store_true", help="store floating-point weights as fp16")
    convert.add_argument("--original-config", help="ldm yaml of the source (default: SRC's sidecar NAME.yaml)")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing destination file")
    convert.set_defaults(func=cmd_convert)

    info = commands.add_parser("info", help="show which Stable Diffusion a checkpoint is")
    info.add_argument("path")
    info.add_argument("--original-config", help="ldm yaml of the checkpoint (default: its sidecar NAME.yaml)")
    info.set_defaults(func=cmd_info)

    demo = commands.add_parser("demo", help="run the built-in demo on a tiny model (CPU, offline)")
    demo.add_argument("--out", default="demo-output", help="folder for the demo's files (default: demo-output)")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DreamBoothError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
