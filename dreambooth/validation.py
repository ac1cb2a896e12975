"""Checks of a :class:`~dreambooth.settings.Settings`: each problem is returned as a sentence a user can act on."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .train.ema import ema_problems
from .train.optimizers import optimizer_problems, optimizer_warnings
from .train.prior import base_prior_problems

if TYPE_CHECKING:
    from .settings import Settings

# model_name becomes NAME_STEP.safetensors, written through a temporary ".NAME_STEP.safetensors.XXXXXXXX.tmp":
# 150 bytes leave room for an 8-digit step, the suffix and the temporary name within a file system's 255 bytes.
MAX_NAME_BYTES = 150
_NAME_FORBIDDEN = '/\\:*?"<>|'
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
# CLIP reads 77 tokens: the start token, 75 of the prompt, the end token.
CLIP_PROMPT_TOKENS = 75
# The resolution each family's released models were trained at (warnings below it); train/families give the default
# resolution a run starts with (SDXL 1024, SD 512: SD 2.x 768-v models keep the 512 default and get this warning).
NATIVE_RESOLUTION = {"sd1": 512, "sd2": 512, "sd2-v": 768, "sdxl": 1024}
PROMPT_FIELDS = (
    "save_sample_prompt",
    "save_sample_negative_prompt",
    "test_prompt",
    "test_negative_prompt",
)
CONCEPT_PROMPT_FIELDS = ("instance_prompt", "class_prompt", "class_negative_prompt", "sample_prompt")


def _probe(path: str, test: str) -> bool:
    """``Path(path).exists() / is_dir() / is_file()`` that answers False instead of raising (NUL, too long)."""
    try:
        return bool(getattr(Path(path), test)())
    except (OSError, ValueError):
        return False


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot be ``model_name`` (it becomes a file and a folder name), or None."""
    if not name:
        return "model_name is empty: choose a name for the output (NAME_STEP.safetensors)"
    bad = sorted({c for c in name if c in _NAME_FORBIDDEN or unicodedata.category(c) == "Cc"})
    if bad:
        shown = " ".join(repr(c)[1:-1] for c in bad)
        return (
            f"model_name '{name[:60]}' must be a plain file name without {shown} (it becomes NAME_STEP.safetensors): "
            "use letters, digits, - and _"
        )
    if name.startswith(".") or name != name.strip() or name.endswith("."):
        return f"model_name '{name[:60]}' may not start with a dot or start or end with a space or a dot"
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        return f"model_name '{name}' is a reserved device name on Windows: choose another"
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        return (
            f"model_name is {size} bytes long; at most {MAX_NAME_BYTES} fit a file name with the step and suffix "
            "(NAME_STEP.safetensors)"
        )
    return None


def _short(value: Any) -> str:
    """A value for a message: numbers of absurd length cut (10**400 is 401 digits)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


def _bounds(settings: Settings) -> list[str]:
    problems = []
    objects = [("", settings)] + [(f"concept {i + 1}: ", c) for i, c in enumerate(settings.concepts)]
    for prefix, obj in objects:
        for spec in dataclasses.fields(obj):
            value = getattr(obj, spec.name)
            meta = spec.metadata
            if value is None or isinstance(value, (list, bool)):
                continue
            if meta.get("choices") and value not in meta["choices"]:
                allowed = ", ".join(meta["choices"])
                problems.append(f"{prefix}{spec.name} is {_short(value)}; it must be one of: {allowed}")
            if isinstance(value, (int, float)):
                if meta.get("minimum") is not None and value < meta["minimum"]:
                    problems.append(f"{prefix}{spec.name} is {_short(value)}; it must be at least {meta['minimum']}")
                if meta.get("maximum") is not None and value > meta["maximum"]:
                    problems.append(f"{prefix}{spec.name} is {_short(value)}; it must be at most {meta['maximum']}")
    return problems


def _bucket_problems(s: Settings) -> list[str]:
    from .data.buckets import resolve_buckets

    try:
        resolve_buckets(s)
    except ValueError as error:
        return [f"aspect-ratio buckets: {error}"]
    return []


def count_images(folder: str) -> int:
    from .data.images import list_images

    return len(list_images(folder)) if folder and _probe(folder, "is_dir") else 0


def _text_problems(settings: Settings) -> list[str]:
    """NUL characters and absurd lengths in every text field (from_dict refuses them too; objects built in code
    are checked here)."""
    from .settings import text_problem

    problems = []
    objects = [("", settings)] + [(f"concept {i + 1}: ", c) for i, c in enumerate(settings.concepts)]
    for prefix, obj in objects:
        for spec in dataclasses.fields(obj):
            value = getattr(obj, spec.name)
            if isinstance(value, str):
                problem = text_problem(spec.name, value)
                if problem:
                    problems.append(prefix + problem)
    return problems


def _output_problems(s: Settings) -> list[str]:
    """The output folders must be folders (or not exist yet), never existing files."""
    problems = []
    if not s.output_dir:
        return problems
    out = Path(s.output_dir)
    for name, value in (
        ("output_dir", out),
        ("checkpoint_dir", out / s.checkpoint_dir),
        ("lora_dir", out / s.lora_dir),
        ("logging_dir", out / s.logging_dir),
    ):
        if _probe(str(value), "exists") and not _probe(str(value), "is_dir"):
            problems.append(f"{name}: '{value}' is a file, not a folder: choose a folder (new or existing)")
    return problems


def _memory_problems(s: Settings) -> list[str]:
    """fused_backward and full_bf16 against the options they cannot work with."""
    from .train.distributed import launched_processes

    problems = []
    if s.fused_backward and s.mixed_precision == "fp16":
        problems.append(
            "fused_backward cannot be used with mixed_precision fp16: the fp16 gradient scaler must see every "
            "gradient before any weight changes; use mixed_precision bf16 or no, or turn fused_backward off"
        )
    processes = launched_processes()
    if s.fused_backward and processes > 1:
        problems.append(
            f"fused_backward cannot be used with several processes ({processes} were launched): the gradients are "
            "summed across processes after the backward pass; train in one process or turn fused_backward off"
        )
    if s.full_bf16 and s.mixed_precision != "bf16":
        problems.append(
            "full_bf16 needs mixed_precision bf16 (the bf16 weights compute under bf16 autocast); set "
            "mixed_precision bf16 or turn full_bf16 off"
        )
    return problems


def _network_problems(s: Settings, check_files: bool) -> list[str]:
    """A LoRA / LoHa / LoKr training_method against what it cannot do (the network_* fields of a full run are
    simply unused)."""
    if not s.trains_network:
        return []
    method = f"training_method {s.training_method}"
    problems = []
    if s.train_text_encoder:
        problems.append(
            f"train_text_encoder trains every weight of the text encoder, which {method} does not: turn it off and "
            "turn network_train_text_encoder on to train adapters on the text encoder"
        )
    if s.save_format != "safetensors":
        problems.append(
            f"{method} writes .safetensors LoRA files only (a pickled .ckpt LoRA can run code when loaded): set "
            "save_format safetensors"
        )
    if isinstance(s.model_name, str) and "=" in s.model_name:
        problems.append(
            f"model_name '{s.model_name[:60]}' may not contain '=' with {method}: the WebUI's <lora:NAME:WEIGHT> "
            "prompt tag could not name the file"
        )
    if s.network_init_from and check_files:
        path = s.network_init_from
        if not _probe(path, "is_file"):
            problems.append(f"network_init_from: '{path}' is not a file: choose a LoRA .safetensors file or clear it")
        elif not path.lower().endswith(".safetensors"):
            problems.append(
                f"network_init_from: '{path}' is not a .safetensors file: LoRA files are read as .safetensors"
            )
    return problems


def _held_out_problem(s: Settings, concept: Any, where: str, found: int) -> list[str]:
    """``validation_split`` must leave the concept at least one image to train on (data/dataset.py holds out the
    rounded share, at least one)."""
    share = s.validation_split
    if concept.validation_data_dir or not isinstance(share, (int, float)) or share <= 0 or not found:
        return []
    held = max(1, round(share * found))
    if held < found:
        return []
    return [
        f"{where}: validation_split {share} holds out {held} of its {found} instance images and leaves none to train "
        "on: lower it, add images, or give the concept a validation_data_dir"
    ]


def validate_settings(settings: Settings, check_files: bool = True, model_in_memory: bool = False) -> list[str]:
    s = settings
    text_problems = _text_problems(s)
    if text_problems:  # paths with NUL characters or of absurd length must not reach the file system
        check_files = False
    problems = text_problems + _bounds(s)
    if isinstance(s.resolution, int) and s.resolution < 10**6 and s.resolution % 8:
        problems.append(f"resolution is {s.resolution}; it must be a multiple of 8 (e.g. {s.resolution // 8 * 8})")
    if s.use_txt_as_label and s.use_filename_as_label:
        problems.append("use_txt_as_label and use_filename_as_label cannot both be on: choose one caption source")
    if s.use_aspect_ratio_bucket:
        problems.extend(_bucket_problems(s))
    if not s.concepts:
        problems.append("no concept: add at least one concept with an instance folder and an instance prompt")
    if not s.output_dir:
        problems.append("output_dir is empty: choose a folder for the checkpoints, samples and logs")
    if not s.pretrained_model_name_or_path and not model_in_memory:
        problems.append("pretrained_model_name_or_path is empty: choose the base model to train from")
    if isinstance(s.model_name, str) and (problem := name_problem(s.model_name)):
        problems.append(problem)
    for name in ("tensorboard", "wandb"):
        if s.report_to == name and importlib.util.find_spec(name) is None:
            problems.append(
                f"report_to {name} needs the {name} package, which is not installed: "
                f"'pip install {name}', or set report_to none"
            )
    if s.mixed_precision == "fp16" and s.device == "cpu":
        problems.append("mixed_precision fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    problems.extend(_memory_problems(s))
    problems.extend(_network_problems(s, check_files))
    problems.extend(optimizer_problems(s))
    problems.extend(ema_problems(s))
    problems.extend(base_prior_problems(s))
    if isinstance(s.max_timestep, int) and isinstance(s.min_timestep, int) and s.min_timestep >= s.max_timestep:
        problems.append(
            f"min_timestep {s.min_timestep} and max_timestep {s.max_timestep} leave no timestep to train: "
            "min_timestep must be below max_timestep"
        )
    if s.attention == "xformers" and importlib.util.find_spec("xformers") is None:
        problems.append("attention xformers needs the xformers package, which is not installed; choose sdpa")
    total_instance = 0
    for index, concept in enumerate(s.concepts, start=1):
        where = f"concept {index}"
        if not concept.instance_prompt.strip():
            problems.append(f"{where}: instance_prompt is empty (e.g. 'photo of zwx dog')")
        if not concept.instance_data_dir:
            problems.append(f"{where}: instance_data_dir is empty: choose the folder of the subject's images")
        elif check_files:
            if not _probe(concept.instance_data_dir, "is_dir"):
                problems.append(f"{where}: instance_data_dir '{concept.instance_data_dir}' is not a folder")
            else:
                found = count_images(concept.instance_data_dir)
                total_instance += found
                if not found:
                    problems.append(f"{where}: no images (png, jpg, jpeg, webp, bmp) in '{concept.instance_data_dir}'")
                problems.extend(_held_out_problem(s, concept, where, found))
        if s.with_prior_preservation:
            if not concept.class_prompt.strip():
                problems.append(f"{where}: prior preservation needs a class_prompt (e.g. 'photo of a dog')")
            if not concept.class_data_dir:
                problems.append(f"{where}: prior preservation needs a class_data_dir (generated images go there)")
            elif (
                check_files
                and _probe(concept.class_data_dir, "exists")
                and not _probe(concept.class_data_dir, "is_dir")
            ):
                problems.append(f"{where}: class_data_dir '{concept.class_data_dir}' is a file, not a folder")
        if concept.validation_data_dir and check_files:
            if not _probe(concept.validation_data_dir, "is_dir"):
                problems.append(f"{where}: validation_data_dir '{concept.validation_data_dir}' is not a folder")
            elif not count_images(concept.validation_data_dir):
                problems.append(
                    f"{where}: no images (png, jpg, jpeg, webp, bmp) in validation_data_dir "
                    f"'{concept.validation_data_dir}'"
                )
    share = s.validation_split if isinstance(s.validation_split, (int, float)) else 0
    if s.save_best is True and not share > 0 and not any(c.validation_data_dir for c in s.concepts):
        problems.append(
            "save_best needs a validation loss: set validation_split above 0 or a concept's validation_data_dir"
        )
    if check_files and total_instance and s.train_batch_size > total_instance:
        problems.append(
            f"train_batch_size is {s.train_batch_size} but there are only {total_instance} instance images: "
            "lower the batch size or add images"
        )
    if check_files:
        problems.extend(_output_problems(s))
        names = ["pretrained_vae_name_or_path", "test_prompts_file"]
        if not model_in_memory:
            names.insert(0, "pretrained_model_name_or_path")
        for name in names:
            value = getattr(s, name)
            if value and not _probe(value, "exists"):
                problems.append(f"{name}: '{value}' does not exist")
        folders = [("pretrained_vae_name_or_path", ("config.json",))]
        if not model_in_memory:
            folders.insert(0, ("pretrained_model_name_or_path", ("model_index.json", "unet")))
        for name, marks in folders:
            value = getattr(s, name)
            if value and _probe(value, "is_dir") and not any(_probe(str(Path(value) / m), "exists") for m in marks):
                problems.append(
                    f"{name}: '{value}' is a folder but not a diffusers model (no {' or '.join(marks)} in it): "
                    "choose a .safetensors/.ckpt file or a diffusers folder"
                )
        if s.test_prompts_file and _probe(s.test_prompts_file, "is_dir"):
            problems.append(
                f"test_prompts_file: '{s.test_prompts_file}' is a folder: choose a text file, one prompt a line"
            )
        model = s.pretrained_model_name_or_path
        if model and not model_in_memory and _probe(model, "exists"):
            from .models.describe import unsupported_family

            family_problem = unsupported_family(model)
            if family_problem:
                problems.append(f"pretrained_model_name_or_path: {family_problem}")
        if s.resume_from:
            problems.extend(_resume_problems(s))
    return problems


def _resume_problems(s: Settings) -> list[str]:
    """A ``resume_from`` that holds no complete state, or one that would train nothing or continue another model."""
    from .train.state import find_state

    try:
        found = find_state(s.resume_from)
    except (OSError, ValueError):  # a NUL or an over-long name: no state there
        found = None
    if found is None:
        return [
            f"resume_from: '{s.resume_from}' is not a training state folder (no complete state.json in it, "
            "nor in a 'state' folder of a run in it)"
        ]
    try:
        info = json.loads((found / "state.json").read_text())
    except (OSError, ValueError):
        return [f"resume_from: '{found}/state.json' is not readable JSON: choose another training state or clear it"]
    problems = []
    step, name = info.get("step"), info.get("model_name")
    method = info.get("training_method", "full")  # states of earlier versions are full runs
    if isinstance(method, str) and method != s.training_method:
        problems.append(
            f"resume_from: the state in '{s.resume_from}' trained with training_method {method}, these settings use "
            f"{s.training_method}: set training_method {method} to continue it, or clear resume_from"
        )
    if isinstance(step, int) and isinstance(s.max_train_steps, int) and step >= s.max_train_steps:
        problems.append(
            f"resume_from: the state in '{s.resume_from}' is at step {step} and max_train_steps is "
            f"{s.max_train_steps}, so nothing would be trained: raise max_train_steps above {step} or clear resume_from"
        )
    if isinstance(name, str) and name and name != s.model_name:
        problems.append(
            f"resume_from: the state in '{s.resume_from}' is of the model '{name}', not of '{s.model_name}': set "
            f"model_name to '{name}' to continue that run, or clear resume_from to start a new one"
        )
    return problems


# ------------------------------------------------------------------------------------------------- warnings


def native_resolution(arch: Any) -> int | None:
    """The resolution a released model of ``arch``'s family was trained at; None when it is not a released size."""
    if not getattr(arch, "is_standard_size", False):
        return None
    key = arch.family + ("-v" if arch.family == "sd2" and arch.is_v_prediction else "")
    return NATIVE_RESOLUTION.get(key)


def resolution_warnings(settings: Settings, arch: Any) -> list[str]:
    """A warning when the run trains below the model's own resolution (it would learn small images)."""
    native = native_resolution(arch)
    if native is None or settings.resolution >= native:
        return []
    return [
        f"resolution is {settings.resolution} but {arch.name} models make {native} px images: training at "
        f"{settings.resolution} teaches it smaller images and costs quality at {native}; set resolution {native} "
        "(or lower it knowingly to save memory)"
    ]


def prompt_warnings(settings: Settings, count_tokens: Any) -> list[str]:
    """A warning for each prompt longer than CLIP reads; ``count_tokens(text)`` -> tokens without start/end."""
    found = []
    places = [("", settings, PROMPT_FIELDS)] + [
        (f"concept {i + 1}: ", c, CONCEPT_PROMPT_FIELDS) for i, c in enumerate(settings.concepts)
    ]
    for prefix, obj, names in places:
        for name in names:
            text = getattr(obj, name)
            if not text:
                continue
            count = count_tokens(text)
            if count > CLIP_PROMPT_TOKENS:
                found.append(
                    f"{prefix}{name} is {count} CLIP tokens long; only the first {CLIP_PROMPT_TOKENS} are used "
                    "(CLIP reads 77 with its start and end tokens): shorten it"
                )
    return found


def training_warnings(settings: Settings, arch: Any, tokenizer: Any = None) -> list[str]:
    """What the trainer logs once the model is loaded: resolution vs the model, prompts longer than CLIP reads,
    zero terminal SNR on an epsilon model, Prodigy's learning rate."""
    found = resolution_warnings(settings, arch)
    if settings.zero_terminal_snr and getattr(arch, "prediction_type", "epsilon") != "v_prediction":
        found.append(
            "zero_terminal_snr is on but this model predicts epsilon: at the last timestep (pure noise) the noise "
            "is trivial to predict and the image cannot be learnt, so zero terminal SNR needs a v-prediction model "
            "(or one converted to it); turn it off for this model"
        )
    found += optimizer_warnings(settings)
    if tokenizer is not None:

        def count_tokens(text: str) -> int:
            return len(tokenizer(text, truncation=False, add_special_tokens=False, verbose=False).input_ids)

        found += prompt_warnings(settings, count_tokens)
    return found
