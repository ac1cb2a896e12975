"""Command line: ``python -m dreambooth COMMAND ...``.

Commands:
  convert SRC DST   single file <-> diffusers folder (direction from SRC/DST), or single file -> single file
  info PATH         which Stable Diffusion a checkpoint or folder is
  train             train from a settings file (headless, progress bar)
  demo              a real DreamBooth run on a tiny model built on the spot (CPU, offline)
  bench             seconds per step and memory: our default vs the naive configuration vs the floor
  estimate          peak GPU memory of a configuration (a dry run, no GPU needed) and what would make it fit
  ui                the DreamBooth tab as its own web app on 127.0.0.1 (needs gradio 3.41)
  tokens PHRASE     how the CLIP tokenizer splits a phrase, with warnings for a poor identifier
  prepare SRC DST   crop and scale a folder of images to training size (square or aspect buckets), with a report
  caption FOLDER    write IMAGE.txt captions beside a folder's images with a local BLIP model (never downloads)
  masks FOLDER      write IMAGE.mask.png (the masked loss's mask) beside each transparent image, from its alpha
  merge-lora BASE LORA OUT      merge a LoRA / LoHa / LoKr into a checkpoint at a weight
  extract-lora TUNED BASE OUT   extract a LoRA from a full fine-tune (SVD of the weight difference)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import DreamBoothError

if TYPE_CHECKING:
    from .settings import Settings

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
    if arch.text_2:
        print(
            f"  second text encoder: {arch.text_2['num_hidden_layers']} layers, hidden {arch.text_2['hidden_size']}, "
            f"projection {arch.text_2['projection_dim']}"
        )
    print(f"  tensors kept as they are: {len(components.extras)}")
    print(f"  needs a sidecar .yaml in the WebUI: {'yes' if arch.needs_sidecar_yaml else 'no'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(Path(args.out), steps=args.steps, vae_steps=args.vae_steps)
    return 0


def launch_processes(count: int, argv: list[str]) -> int:
    """``train --num-processes N``: hand the same command over to a launcher, N processes on this machine.

    GPUs: ``accelerate launch --multi_gpu``; CPU: ``torchrun`` (accelerate starts several CPU processes only through
    MPI).  Both bind their rendezvous to 127.0.0.1.
    """
    import os
    import socket
    import subprocess

    import torch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    if torch.cuda.is_available():
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(count)]
        launcher += ["--main_process_ip", "127.0.0.1", "--main_process_port", port]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(count)]
        launcher += ["--master_addr", "127.0.0.1", "--master_port", port]
    command = [*launcher, "-m", "dreambooth", *argv]
    print("launching: " + " ".join(command), flush=True)
    return subprocess.run(command, env=os.environ.copy(), check=False).returncode


def _train_argv(args: argparse.Namespace) -> list[str]:
    argv = ["train", "--config", args.config]
    for assignment in args.set or []:
        argv += ["--set", assignment]
    return argv + (["--debug"] if getattr(args, "debug", False) else [])


def _family_resolution(settings: Settings, config: Path, assignments: list[str], notes: list[str]) -> Settings:
    """The base model's family's resolution (SDXL: 1024) when neither the settings file nor ``--set`` gives one.

    Only for a .safetensors file or a diffusers folder, whose sizes are read without the weights; a base that cannot
    be read is left to the settings' checks."""
    import dataclasses
    import json

    from .models.describe import architecture_of
    from .train.families import family_for

    try:
        given = "resolution" in json.loads(Path(config).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return settings
    if given or any(a.split("=", 1)[0].strip() == "resolution" for a in assignments):
        return settings
    base = Path(settings.pretrained_model_name_or_path)
    if not (base.is_dir() or base.suffix.lower() == ".safetensors"):
        return settings
    try:
        resolution = family_for(architecture_of(base)).default_resolution
    except DreamBoothError:
        return settings
    if resolution == settings.resolution:
        return settings
    notes.append(f"resolution {resolution}: the default of the base model's family (set resolution to change it)")
    return dataclasses.replace(settings, resolution=resolution)


def cmd_train(args: argparse.Namespace) -> int:
    import os
    import shlex
    import signal
    import traceback

    from .events import Callbacks, Commands
    from .settings import Settings, SettingsError
    from .train.failures import TrainingFailed
    from .train.loop import Trainer

    if args.num_processes > 1 and "WORLD_SIZE" not in os.environ:
        return launch_processes(args.num_processes, _train_argv(args))
    is_main = os.environ.get("RANK", "0") == "0"  # under a launcher only the first process prints

    notes: list[str] = []  # the guide's names that were translated or are ignored
    try:
        settings = Settings.load(args.config, notes=notes).with_overrides(args.set or [], notes=notes)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings = _family_resolution(settings, args.config, args.set or [], notes)
    for note in notes if is_main else []:
        print(f"note: {note}", file=sys.stderr)
    problems = settings.validate()
    if problems:
        print(f"error: {args.config}: {len(problems)} problem(s):", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    commands = Commands()

    def interrupt(signum, frame):  # first Ctrl-C: stop after this step with a resumable state
        if commands.cancelled:
            raise KeyboardInterrupt
        print("\ncancelling after the current step (Ctrl-C again to abort without saving)", file=sys.stderr)
        commands.cancel()

    previous = signal.signal(signal.SIGINT, interrupt)

    class Bar(Callbacks):
        def __init__(self) -> None:
            self.bar = None

        def on_progress(self, progress):
            from tqdm import tqdm

            if progress.phase != "training":
                if progress.message and progress.phase not in ("caching",):
                    tqdm.write(f"[{progress.phase}] {progress.message}")
                return
            if self.bar is None:
                self.bar = tqdm(total=progress.total_steps, initial=progress.step - 1, unit="step", dynamic_ncols=True)
            self.bar.update(progress.step - self.bar.n)
            self.bar.set_postfix(loss=f"{progress.loss:.4f}", mem=f"{progress.peak_memory_gib:.2f}GiB")

        def on_log(self, message):
            from tqdm import tqdm

            tqdm.write(message)

    bar = Bar()
    try:
        result = Trainer(settings, callbacks=bar if is_main else None, commands=commands).run()
    except TrainingFailed as error:
        if bar.bar is not None:
            bar.bar.close()
        if args.debug:
            traceback.print_exception(type(error), error, error.__traceback__)
        print(f"error: {error}", file=sys.stderr)
        if error.state_dir is not None and is_main:
            command = " ".join(shlex.quote(a) for a in [*_train_argv(args), "--set", f"resume_from={error.state_dir}"])
            print(f"resume: python -m dreambooth {command}", file=sys.stderr)
        if not args.debug:
            print("(--debug shows the traceback)", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
        if bar.bar is not None:
            bar.bar.close()
    if not is_main:
        return 130 if result.cancelled else 0
    state = f"; resumable state: {result.state_dir}" if result.state_dir else ""
    print(f"{'cancelled' if result.cancelled else 'finished'} at step {result.step} of {result.total_steps}{state}")
    for path in result.checkpoints:
        print(f"checkpoint: {path}")
    if result.samples:
        print(f"samples: {result.samples[-1].parent}")
    return 130 if result.cancelled else 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    run_bench(args)
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    """The estimate of ``--config`` (with ``--set``) and, when it does not fit the GPU, what would."""
    import dataclasses
    import math

    from .settings import Settings, SettingsError

    if args.gpu_memory is not None and not (math.isfinite(args.gpu_memory) and 0 < args.gpu_memory <= 4096):
        raise DreamBoothError(f"--gpu-memory {args.gpu_memory:g}: give the GPU's size in GB, e.g. --gpu-memory 8.")
    if args.processes < 1:
        raise DreamBoothError(f"--processes {args.processes}: give the number of processes, 1 or more.")
    notes: list[str] = []
    try:
        settings = Settings.load(args.config, notes=notes) if args.config else Settings()
        settings = settings.with_overrides(args.set or [], notes=notes)
    except SettingsError as error:
        raise DreamBoothError("; ".join(error.problems)) from error
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    if not args.arch and not settings.pretrained_model_name_or_path:
        raise DreamBoothError(
            "estimate needs a base model: --config FILE (a settings JSON naming one), "
            "--set pretrained_model_name_or_path=FILE, or --arch NAME (e.g. --arch sd15)."
        )
    if args.gpu_memory is not None:
        settings = dataclasses.replace(settings, gpu_memory_gb=args.gpu_memory)
    from .memory.estimate import ARCH_SHORTCUTS, format_estimate
    from .memory.fit import Fitter, changes_text, gpu_bytes_for
    from .memory.report import gib, suggestions_text, verdict

    if args.arch and args.arch not in ARCH_SHORTCUTS:
        raise DreamBoothError(f"--arch {args.arch}: not a known architecture; one of {', '.join(ARCH_SHORTCUTS)}.")
    fitter = Fitter(settings, arch=ARCH_SHORTCUTS[args.arch] if args.arch else None, processes=args.processes)
    gpu_bytes = gpu_bytes_for(settings)
    estimate = fitter.estimate()
    print(format_estimate(estimate))
    print(verdict(estimate, gpu_bytes))
    if settings.low_memory:
        if gpu_bytes is None:
            print(f"low_memory (fit my GPU), GPU size not known: it turns on {changes_text(fitter.every_switch())}")
        else:
            changes, preset = fitter.fit_preset(gpu_bytes)
            print(f"low_memory (fit my GPU) chooses: {changes_text(changes)}: {gib(preset.total_bytes)}")
    elif gpu_bytes is not None and estimate.total_bytes > gpu_bytes:
        print(suggestions_text(fitter.suggestions(gpu_bytes), gpu_bytes))
    for changes, why in fitter.failures.items():
        print(f"left out, the estimate cannot follow it: {changes}: {why}")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        raise DreamBoothError("the ui command needs gradio: pip install gradio==3.41.2 (or use the WebUI's tab)")
    from .ui.standalone import launch

    launch(args.models_dir, port=args.port, allowed_roots=args.allow, write_roots=args.allow_write, auth=args.auth)
    return 0


def cmd_tokens(args: argparse.Namespace) -> int:
    from .tokens import identifier_report

    print(identifier_report(args.phrase, args.class_prompt))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from .data.prepare import load_focal_points, parse_colour, prepare_folder

    crop = args.crop or ("focal" if args.focal_file else "center")
    if args.focal_file and crop != "focal":
        raise DreamBoothError(f"--focal-file {args.focal_file}: focal points are used only with --crop focal.")
    if crop == "focal" and not args.focal_file:
        raise DreamBoothError('--crop focal needs --focal-file JSON with a point per image: {"a.jpg": [0.5, 0.3]}.')
    focal_points = load_focal_points(args.focal_file) if args.focal_file else None
    background = parse_colour(args.background)
    show_progress = sys.stderr.isatty()

    def progress(done: int, total: int, source: Path) -> None:
        print(f"\r{done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    report = prepare_folder(
        args.src,
        args.dst,
        size=args.size,
        crop=crop,
        bucket=args.bucket,
        image_format=args.format,
        background=background,
        focal_points=focal_points,
        progress=progress if show_progress else None,
        overwrite=args.overwrite,
    )
    print(report.summary())
    if not report.written:
        print(f"error: no image was written from {args.src}.", file=sys.stderr)
        return 1
    return 0


def cmd_masks(args: argparse.Namespace) -> int:
    from .data.loss_masks import write_alpha_masks

    report = write_alpha_masks(args.folder, overwrite=args.overwrite)
    print(report.summary())
    return 0


def cmd_caption(args: argparse.Namespace) -> int:
    import os
    import signal

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: the model is only read
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from .data.captioning import BlipCaptioner, caption_folder, caption_path, images_to_caption

    pending = set(images_to_caption(args.folder, overwrite=args.overwrite))  # checks the folder before the model
    if not pending:
        print(f"{args.folder}: every image already has its caption file (use --overwrite to write them again)")
        return 0
    print(f"loading {args.model} on {args.device}")
    captioner = BlipCaptioner(args.model, device=args.device)
    stop: list[bool] = []

    def interrupt(signum, frame):  # first Ctrl-C: stop after this image; the captions written so far stay
        if stop:
            raise KeyboardInterrupt
        print("\nstopping after the current image (Ctrl-C again to abort)", file=sys.stderr)
        stop.append(True)

    def progress(done: int, total: int, image: Path) -> None:
        if image in pending and caption_path(image).is_file():
            print(f"[{done}/{total}] {caption_path(image)}: {caption_path(image).read_text(encoding='utf-8').strip()}")

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        report = caption_folder(
            args.folder,
            captioner,
            prefix=args.prefix,
            suffix=args.suffix,
            overwrite=args.overwrite,
            dedupe_tags=not args.no_dedupe,
            progress=progress,
            should_stop=lambda: bool(stop),
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    for problem in report.failed:
        print(f"failed: {problem.path}: {problem.reason}", file=sys.stderr)
    print(report.summary())
    if report.cancelled:
        return 130
    return 1 if report.failed else 0


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
    demo.add_argument("--steps", type=int, default=600, help="training steps (default: 600)")
    demo.add_argument(
        "--vae-steps",
        type=int,
        default=400,
        help="steps teaching the tiny VAE to reconstruct (default: 400)",
    )
    demo.set_defaults(func=cmd_demo)

    train = commands.add_parser("train", help="train from a settings JSON file")
    train.add_argument("--config", required=True, help="settings JSON (as saved by the tab or the demo)")
    train.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override one setting (repeatable), e.g. --set seed=7; a concept's field: --set "
        "concepts.0.class_data_dir=DIR (concepts count from 0; concepts.N with N concepts adds one); with a single "
        "concept its fields also by their own names, e.g. --set class_data_dir=DIR",
    )
    train.add_argument(
        "--num-processes",
        type=int,
        default=1,
        metavar="N",
        help="train data-parallel with N processes on this machine (accelerate launch on GPUs, torchrun on CPU)",
    )
    train.add_argument(
        "--debug", action="store_true", help="on a failure, print the traceback too (default: one message)"
    )
    train.set_defaults(func=cmd_train)

    bench = commands.add_parser("bench", help="measure seconds per step and memory (not a test)")
    from .bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)

    estimate = commands.add_parser(
        "estimate",
        help="peak GPU memory of a configuration and what would make it fit (no GPU needed)",
        description="Runs one training step of the configuration on fake tensors (the real modules of the base "
        "model's architecture, read from its header; no weights are read) and prints its peak GPU memory with a "
        "breakdown. With a GPU size (--gpu-memory, gpu_memory_gb, or the GPU present) that it does not fit: the "
        "cheapest changes that make it fit, each with its estimate and its cost in speed; with low_memory on: what "
        "'fit my GPU' chooses. Exit status 0 whether it fits or not; 2 on bad input.",
    )
    estimate.add_argument("--config", help="settings JSON (as saved by the tab); default: the default settings")
    estimate.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override one setting (repeatable), as in train --set"
    )
    estimate.add_argument("--gpu-memory", type=float, metavar="GB", help="the GPU's size in GB (default: detected)")
    estimate.add_argument(
        "--arch", metavar="NAME", help="the architecture instead of the base model's (e.g. sd15, sd21, sd21-512)"
    )
    estimate.add_argument(
        "--processes", type=int, default=1, metavar="N", help="data-parallel processes, one GPU each (default: 1)"
    )
    estimate.set_defaults(func=cmd_estimate)

    ui = commands.add_parser("ui", help="serve the DreamBooth tab as a standalone app on 127.0.0.1")
    ui.add_argument("--models-dir", default="models", help="models folder laid out like the WebUI's (default: models)")
    ui.add_argument("--port", type=int, default=7870, help="port on 127.0.0.1 (default: 7870)")
    ui.add_argument(
        "--allow",
        action="append",
        metavar="DIR",
        help="a folder the app may also read datasets and models from (repeatable; default: home, cwd, models dir)",
    )
    ui.add_argument(
        "--allow-write",
        action="append",
        metavar="DIR",
        help="a folder the app may also write to: class images, prepared datasets, captions (repeatable; default: "
        "only the models dir's Stable-diffusion, Lora and dreambooth folders)",
    )
    ui.add_argument(
        "--auth",
        metavar="USER:PASS",
        help="a login for the page and HTTP basic auth for the REST routes (several: u1:p1,u2:p2)",
    )
    ui.set_defaults(func=cmd_ui)

    tokens = commands.add_parser("tokens", help="how CLIP tokenizes a phrase; warnings for a poor identifier")
    tokens.add_argument("phrase", help="e.g. 'photo of ohwx dog'")
    tokens.add_argument("--class-prompt", default="", help="words also in the class prompt are not the identifier")
    tokens.set_defaults(func=cmd_tokens)

    prepare = commands.add_parser(
        "prepare",
        help="crop and scale a folder of images to training size, with a report of every problem",
        description="Every image under SRC (recursively) is turned upright, composited on a background if "
        "transparent, scaled to cover the target (Lanczos) and cropped, and written under DST at the same relative "
        "path; IMAGE.txt captions are copied beside their image. SRC is never modified. Images smaller than the "
        "target are written upscaled and reported; duplicates, unreadable files and name clashes are skipped and "
        "reported. Exit status: 0 when at least one image was written, 1 when none was, 2 on an error.",
    )
    prepare.add_argument("src", help="folder of source images (read recursively, never modified)")
    prepare.add_argument("dst", help="output folder: new or empty (see --overwrite), not inside SRC")
    prepare.add_argument(
        "--size", type=int, default=512, help="side of the square output, or the bucket resolution (default: 512)"
    )
    prepare.add_argument(
        "--crop",
        choices=["center", "entropy", "focal"],
        help="center (default), entropy (the window with the most edge detail) or focal (centred on --focal-file "
        "points)",
    )
    prepare.add_argument(
        "--focal-file",
        metavar="JSON",
        help='focal points {"sub/photo.jpg": [x, y]}, fractions of the upright image (implies --crop focal)',
    )
    prepare.add_argument(
        "--bucket", action="store_true", help="crop each image to its closest aspect bucket instead of a square"
    )
    prepare.add_argument("--format", choices=["png", "jpg", "webp"], default="png", help="output format (default: png)")
    prepare.add_argument(
        "--background",
        default="#ffffff",
        metavar="COLOUR",
        help="colour under transparent areas: #RRGGBB or R,G,B (default: #ffffff)",
    )
    prepare.add_argument(
        "--overwrite", action="store_true", help="allow a non-empty DST; files of the same names are replaced"
    )
    prepare.set_defaults(func=cmd_prepare)

    caption = commands.add_parser(
        "caption",
        help="write IMAGE.txt captions beside a folder's images with a local BLIP model",
        description="Caption every image of FOLDER (and its subfolders) with a BLIP model read from disk and write "
        "IMAGE.txt beside IMAGE.png, the file the 'txt' caption source reads; the images are never changed. Nothing "
        "is downloaded: --model is a folder holding a saved BLIP captioning model, or the id of one already in the "
        "Hugging Face cache (e.g. Salesforce/blip-image-captioning-base).",
    )
    caption.add_argument("folder", help="folder of training images")
    caption.add_argument(
        "--model", required=True, metavar="PATH_OR_CACHED_ID", help="BLIP model folder, or a model id in the HF cache"
    )
    caption.add_argument("--prefix", default="", help="text put before every caption, e.g. 'ohwx dog'")
    caption.add_argument("--suffix", default="", help="text put after every caption")
    caption.add_argument("--overwrite", action="store_true", help="replace existing caption files (default: keep)")
    caption.add_argument(
        "--no-dedupe", action="store_true", help="keep repeated comma-separated tags (default: drop repeats)"
    )
    caption.add_argument("--device", default="cpu", help="torch device for the model, e.g. cuda (default: cpu)")
    caption.set_defaults(func=cmd_caption)

    masks = commands.add_parser(
        "masks",
        help="write IMAGE.mask.png beside each transparent image from its alpha channel (for masked_loss)",
        description="For every image of FOLDER (and its subfolders) with transparent pixels, write IMAGE.mask.png "
        "beside it: its alpha channel, upright (EXIF rotation applied), opaque = white = trained, transparent = "
        "black = ignored by masked_loss. Existing masks are kept unless --overwrite. The images are never changed.",
    )
    masks.add_argument("folder", help="folder of training images")
    masks.add_argument("--overwrite", action="store_true", help="replace existing masks (default: keep them)")
    masks.set_defaults(func=cmd_masks)

    from .cli_tools import add_parsers

    add_parsers(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DreamBoothError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
