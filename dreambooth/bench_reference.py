"""The reference row of ``python -m dreambooth bench --reference SCRIPT``: diffusers' own DreamBooth script.

``SCRIPT`` is ``examples/dreambooth/train_dreambooth.py`` from the diffusers release in use (with ``bench
--training-method lora``: ``examples/dreambooth/train_dreambooth_lora.py``, which needs peft), run unmodified on the
benchmark's model (written as a diffusers folder), images, resolution, batch and options.  It runs in a subprocess
of this interpreter through a small runner (:func:`run_script`) that records ``time.perf_counter()`` after every
optimizer step (``torch.optim.optimizer.register_optimizer_step_post_hook``) and the process's peak RSS; seconds
per step is the median of the differences between consecutive step times, warm-up steps left out as ``bench``
does.  The script needs ``torchvision``: ``envs/reference-bench.sh`` builds such an environment, ``.venv-ref``.

On the SDXL scales (``tiny-sdxl128``, ``tiny-sdxl256``) the script is
``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (diffusers has SDXL DreamBooth only as LoRA), given the same
options but ``--pre_compute_text_embeddings``, which it lacks: with the text encoders frozen it encodes the instance
and class prompts once by itself, as our embedding cache does.  It adapts the same layers as the SD script, in both
text encoders when they train; its VAE encodes every step, in fp32 (it has no latent cache), and its time ids come
from each image's crop.

What diffusers' LoRA script cannot be told (v0.40.0; its command line has no option for them), and so differs from a
LoRA bench row of ours unless the bench sets ours to match: alpha is always the rank (``lora_alpha=args.rank``); the
UNet's adapted layers are always the attention projections ``to_q``, ``to_k``, ``to_v``, ``to_out.0`` (kohya's
choice, ours by default, adds ``proj_in``, ``proj_out`` and the feed-forward ``ff.net.0.proj``, ``ff.net.2``); the
text encoder's ``q_proj``, ``k_proj``, ``v_proj``, ``out_proj`` (kohya's adds ``fc1``, ``fc2``); one learning rate
for the UNet and the text encoder; the adapters start from a Gaussian ``lora_A`` (kohya's: Kaiming-uniform); the
optimizer is torch's AdamW with its own defaults (not fused).  Each row records how many parameters the optimizer
steps (``trained_parameters``), so a difference of adapted layers shows in the table.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

MODE = "diffusers-script"
METHODS = ("full", "lora")  # the training methods a reference script exists for
REPOSITORY = Path(__file__).resolve().parent.parent
_RUNNER = "import sys; from dreambooth.bench_reference import run_script; sys.exit(run_script(sys.argv[1:]))"
_WRITER = "import sys; from dreambooth.bench_reference import write_bench_model; write_bench_model(*sys.argv[1:])"


def steady_step_seconds(times: list[float], warmup: int) -> list[float]:
    """Durations of the steady-state steps from the times at which steps 1..N ended.

    The difference ``times[k] - times[k-1]`` is the duration of step ``k+1`` (step 1 has no start time: it also
    holds the set-up).  As in ``bench``, the first ``warmup`` steps are left out: steps ``warmup+1 .. N`` remain.
    """
    durations = [later - earlier for earlier, later in itertools.pairwise(times)]
    return durations[max(warmup - 1, 0) :]


def script_arguments(
    config: dict[str, Any],
    model_dir: Path,
    instance_dir: Path,
    class_dir: Path,
    output_dir: Path,
    class_images: int,
) -> list[str]:
    """The reference script's command line for a bench configuration, with our trainer's defaults for the rest.

    Full fine-tuning (``config["method"]`` "full" or absent): train_dreambooth.py's.  LoRA (``"lora"``):
    train_dreambooth_lora.py's, with the configuration's ``rank`` and ``learning_rate`` (the bench gives our trainer
    the same, and alpha = rank, the script's only choice), and ``--pre_compute_text_embeddings`` when the text
    encoder is frozen (the script's own option to encode the prompts once, as our trainer's embedding cache does).
    """
    from .bench import CLASS_PROMPT, INSTANCE_PROMPT
    from .settings import Settings

    ours = Settings()
    steps, method = config["steps"], config.get("method", "full")
    if method not in METHODS:
        raise ValueError(f"no diffusers reference script for the training method {method!r} (one of {METHODS})")
    learning_rate = config["learning_rate"] if method == "lora" else ours.learning_rate
    args = [
        "--pretrained_model_name_or_path", str(model_dir),
        "--instance_data_dir", str(instance_dir),
        "--instance_prompt", INSTANCE_PROMPT,
        "--output_dir", str(output_dir),
        "--resolution", str(_model_and_resolution(config)[1]),
        "--center_crop",
        "--train_batch_size", str(config["batch"]),
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(steps + 1),
        "--learning_rate", repr(learning_rate),
        "--lr_scheduler", ours.lr_scheduler,
        "--lr_warmup_steps", str(ours.lr_warmup_steps),
        "--adam_beta1", repr(ours.adam_beta1),
        "--adam_beta2", repr(ours.adam_beta2),
        "--adam_weight_decay", repr(ours.adam_weight_decay),
        "--adam_epsilon", repr(ours.adam_epsilon),
        "--max_grad_norm", repr(ours.max_grad_norm),
        "--mixed_precision", "no",
        "--seed", str(ours.seed),
        "--dataloader_num_workers", "0",
    ]  # fmt: skip
    if config["prior"]:
        args += [
            "--with_prior_preservation",
            "--class_data_dir", str(class_dir),
            "--class_prompt", CLASS_PROMPT,
            "--num_class_images", str(class_images),
            "--prior_loss_weight", repr(ours.prior_loss_weight),
        ]  # fmt: skip
    if config["train_text"]:
        args.append("--train_text_encoder")
    if method == "lora":
        args += ["--rank", str(config["rank"])]
        if is_sdxl_config(config):
            # train_dreambooth_lora_sdxl.py encodes one instance prompt (and the class prompt) once by itself when
            # the text encoders are frozen (it has no option for it); its text encoders' rate is its own option
            if config["train_text"]:
                args += ["--text_encoder_lr", repr(learning_rate)]
        elif not config["train_text"]:
            args.append("--pre_compute_text_embeddings")
    return args


def is_sdxl_config(config: dict[str, Any]) -> bool:
    """Whether a bench configuration's model is an SDXL (its reference is train_dreambooth_lora_sdxl.py)."""
    from .bench import bench_architecture

    return bench_architecture(_model_and_resolution(config)[0]).is_sdxl


def check_script_method(script: Path, method: str, sdxl: bool = False) -> None:
    """Refuse a reference script that trains something else than ``method`` (or another family than the bench
    model's, ``sdxl``): train_dreambooth_lora.py accepts all of train_dreambooth.py's options, so a mix-up would
    otherwise compare a LoRA with a full fine-tune unnoticed."""
    text = script.read_text(encoding="utf-8", errors="replace")
    trains_sdxl = "StableDiffusionXLPipeline" in text
    if trains_sdxl != sdxl:
        what = "an SDXL model" if trains_sdxl else "an SD 1.x / 2.x model (it never uses StableDiffusionXLPipeline)"
        wanted = "train_dreambooth_lora_sdxl.py" if sdxl else "train_dreambooth.py or train_dreambooth_lora.py"
        raise ValueError(
            f"{script}: this reference script trains {what}, but the bench scale is "
            f"{'an SDXL' if sdxl else 'an SD 1.x'} one: pass diffusers' examples/dreambooth/{wanted}."
        )
    if sdxl and method != "lora":
        raise ValueError(
            f"{script}: diffusers has SDXL DreamBooth only as a LoRA script; run the SDXL scales with "
            "--training-method lora."
        )
    trains_lora = "LoraConfig" in text
    if trains_lora != (method == "lora"):
        what = "a LoRA (it uses peft's LoraConfig)" if trains_lora else "the full model (it never uses LoraConfig)"
        wanted = "train_dreambooth_lora.py" if method == "lora" else "train_dreambooth.py"
        raise ValueError(
            f"{script}: this reference script trains {what}, but the bench's training method is {method}: "
            f"pass diffusers' examples/dreambooth/{wanted}, or the matching --training-method."
        )


def measure_reference(script: str | os.PathLike, config: dict[str, Any], work: str | os.PathLike) -> dict[str, Any]:
    """Run ``script`` on a bench configuration and return its bench row (mode ``diffusers-script``).

    ``config`` is a bench configuration: ``scale`` (or ``model`` and ``resolution``), ``prior``, ``train_text``,
    ``batch``, ``steps``, ``warmup``; for LoRA also ``method`` "lora", ``rank`` and ``learning_rate``.  The model
    folder and the images are written under ``work`` once and reused
    by later calls with the same model or resolution; the script's output folder is removed after each run.
    """
    from .bench import _dataset

    script, work = Path(script).resolve(), Path(work)
    if not script.is_file():
        raise FileNotFoundError(f"{script}: no such reference script")
    method = config.get("method", "full")
    check_script_method(script, method, is_sdxl_config(config))
    model, resolution = _model_and_resolution(config)
    model_dir = work / f"model-{model}"
    if not model_dir.is_dir():
        _run([sys.executable, "-c", _WRITER, model, str(model_dir)], f"writing the {model} model folder")
    data = work / f"data-{resolution}"
    if not data.is_dir():
        _dataset(data, resolution)
    instance_dir, class_dir = data / "instance", data / "class"
    class_images = sum(1 for path in class_dir.iterdir() if path.is_file())
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    try:
        times_file = run_dir / "steps.json"
        args = script_arguments(config, model_dir, instance_dir, class_dir, run_dir / "out", class_images)
        _run([sys.executable, "-c", _RUNNER, str(times_file), str(script), *args], f"{script.name} {config}")
        recorded = json.loads(times_file.read_text())
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    times = recorded["step_times"]
    if len(times) != config["steps"]:
        raise RuntimeError(f"{script.name} made {len(times)} optimizer steps, not {config['steps']}")
    steady = steady_step_seconds(times, config["warmup"])
    if not steady:
        raise RuntimeError(f"{config['steps']} steps leave no steady-state step after {config['warmup']} of warm-up")
    return {
        "scale": config.get("scale", f"{model}-{resolution}"),
        "prior": config["prior"],
        "train_text": config["train_text"],
        "mode": MODE,
        "method": method,
        **({"rank": config["rank"], "targets": "diffusers"} if method == "lora" else {}),
        "seconds_per_step": statistics.median(steady),
        "trained_parameters": recorded["trained_parameters"],
        "peak_memory_gib": recorded["peak_rss_kib_training"] / 2**20,  # through the last step, as bench's rows
        "peak_memory_gib_exit": recorded["peak_rss_kib_exit"] / 2**20,  # with the script's final pipeline save
    }


def _model_and_resolution(config: dict[str, Any]) -> tuple[str, int]:
    from .bench import SCALES

    if "model" in config:
        return config["model"], int(config["resolution"])
    return SCALES[config["scale"]]


def _run(command: list[str], what: str) -> None:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPOSITORY), os.environ.get("PYTHONPATH")) if p),
    }
    output = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if output.returncode != 0:
        raise RuntimeError(f"{what} failed (exit code {output.returncode}):\n{output.stderr[-3000:]}")


# ------------------------------------------------------------------------------------------ in the subprocesses


def write_bench_model(model: str, destination: str | os.PathLike) -> Path:
    """The bench model (the same random weights as ``bench``'s runs) as a diffusers folder with its tokenizer."""
    from .bench import bench_architecture
    from .models.components import save_diffusers_folder
    from .models.tiny import tiny_components

    return save_diffusers_folder(tiny_components(bench_architecture(model), seed=0), destination)


def run_script(argv: list[str]) -> int:
    """Runner: ``TIMES_JSON SCRIPT ARGS...`` -- run SCRIPT as ``__main__`` and write its optimizer-step times, its
    peak RSS and how many parameters its optimizer steps (at the first step)."""
    import resource
    import runpy
    import time

    from torch.optim.optimizer import register_optimizer_step_post_hook

    times_file, script, *args = argv
    times: list[float] = []
    rss = [0]
    trained = [0]

    def after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
        times.append(time.perf_counter())
        if len(times) == 1:
            trained[0] = trained_parameters(optimizer)
        rss[0] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux

    register_optimizer_step_post_hook(after_step)
    sys.argv = [script, *args]
    sys.path[0] = str(Path(script).resolve().parent)  # as `python SCRIPT` would have it
    code = 0
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        record = {
            "step_times": times,
            "peak_rss_kib_training": rss[0],
            "peak_rss_kib_exit": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
            "trained_parameters": trained[0],
        }
        Path(times_file).write_text(json.dumps(record))
    return code


def trained_parameters(optimizer: Any) -> int:
    """How many parameters (elements) ``optimizer`` steps: every parameter of its groups, counted once."""
    params = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    return sum(p.numel() for p in params.values())
