"""The settings of a training run: every field declared once, with its default, bounds and help text.

Field names follow the community DreamBooth guide (``pretrained_model_name_or_path``, ``instance_data_dir``,
``with_prior_preservation``, ``prior_loss_weight``, ...) since users bring its configs; our own names only for what
it lacks.  The UI and the README are built from, or checked against, :func:`fields`.

* :meth:`Settings.validate` returns every problem as a sentence; nothing is corrected silently.
* JSON files carry ``schema_version``; older versions are migrated step by step (:data:`MIGRATIONS`).
* :func:`concepts_from_list` imports the guide's ``concepts_list.json``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DreamBoothError

SCHEMA_VERSION = 2
SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "cosine_with_hard_restarts",
    "polynomial",
)


class SettingsError(DreamBoothError):
    """Settings that cannot be used; ``problems`` lists every reason as a sentence."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in self.problems))


def setting(
    default: Any,
    help: str,
    group: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    headless_only: bool = False,
) -> Any:
    """Declare one settings field: default, one-line help, UI group, bounds / choices, accepted old names."""
    metadata = {
        "help": help,
        "group": group,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "aliases": aliases,
        "headless_only": headless_only,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Concept:
    """One subject (or style) to teach: its images, its prompts, and its class for prior preservation."""

    instance_data_dir: str = setting("", "Folder of the subject's images (searched recursively).", "concept")
    instance_prompt: str = setting(
        "", "Prompt with the rare identifier, e.g. 'photo of zwx dog'; [filewords] inserts the caption.", "concept"
    )
    class_data_dir: str = setting(
        "", "Folder of class (regularisation) images; missing ones are generated there.", "concept"
    )
    class_prompt: str = setting("", "Prompt of the class without the identifier, e.g. 'photo of a dog'.", "concept")
    class_negative_prompt: str = setting("", "Negative prompt used when generating class images.", "concept")
    num_class_images: int | None = setting(
        None, "Class images for this concept (empty: the global num_class_images).", "concept", minimum=0
    )
    sample_prompt: str = setting("", "Prompt of this concept's samples (empty: the instance prompt).", "concept")


@dataclass
class Settings:
    """Everything one training run needs.  See :func:`fields` for help texts and bounds."""

    # --- model and output
    pretrained_model_name_or_path: str = setting(
        "", "Base model: a .safetensors/.ckpt file (with NAME.yaml beside it if any) or a diffusers folder.", "model"
    )
    pretrained_vae_name_or_path: str = setting(
        "", "A separate VAE (.safetensors/.ckpt file or diffusers VAE folder); empty: the model's own.", "model"
    )
    output_dir: str = setting(
        "",
        "Folder for checkpoints, samples, logs and the training state (the tab: one folder per model name).",
        "model",
        headless_only=True,
    )
    model_name: str = setting("dreambooth", "Name of the output: NAME_STEP.safetensors.", "model")
    checkpoint_dir: str = setting(
        "",
        "Folder of the output checkpoints (empty: output_dir; relative: inside output_dir; the tab: the WebUI's "
        "model folder).",
        "saving",
        headless_only=True,
    )
    save_format: str = setting("safetensors", "Output file format.", "saving", choices=("safetensors", "ckpt"))
    save_half: bool = setting(
        False, "Store the output checkpoint in fp16 (half the size).", "saving", aliases=("save_unet_half",)
    )
    resume_from: str = setting("", "A training state folder to continue from (output_dir/state/...).", "model")

    # --- data
    concepts: list[Concept] = setting([], "The concepts to train (any number).", "concepts")
    resolution: int = setting(512, "Training resolution in pixels (multiple of 8).", "basics", minimum=64, maximum=4096)
    center_crop: bool = setting(False, "Crop the centre of each image (else a random crop each epoch).", "basics")
    hflip: bool = setting(False, "Also train on horizontally flipped images (random per epoch).", "basics")
    use_txt_as_label: bool = setting(False, "Caption each image from IMAGE.txt beside it.", "basics")
    use_filename_as_label: bool = setting(False, "Caption each image from its file name.", "basics")
    caption_template: str = setting(
        "[PX][P]", "How the caption combines with the prompt: [PX] the prompt, [P] the caption.", "basics"
    )

    # --- aspect-ratio buckets and augmentation
    use_aspect_ratio_bucket: bool = setting(
        False,
        "Train each image at the bucket (about resolution² pixels) closest to its aspect ratio, not a square crop.",
        "dataset",
    )
    aspect_buckets: str = setting(
        "", "Custom bucket list, e.g. '512x512 576x448 448x576' (empty: generated from the sides below).", "dataset"
    )
    bucket_min_side: int | None = setting(
        None, "Smallest generated bucket side in px, a multiple of 64 (empty: resolution / 2).", "dataset", minimum=64
    )
    bucket_max_side: int | None = setting(
        None, "Largest generated bucket side in px, a multiple of 64 (empty: resolution x 2).", "dataset", minimum=64
    )
    debug_arb: bool = setting(
        False, "Log every image's bucket and the counts, and save them to output_dir/buckets.json.", "dataset"
    )
    augment_probability: float = setting(
        0.5,
        "Chance that each augmentation below is applied to an augmented variant.",
        "dataset",
        minimum=0.0,
        maximum=1.0,
    )
    augment_rotation: float = setting(
        0.0, "Rotate by up to this many degrees either way (0: off).", "dataset", minimum=0.0, maximum=30.0
    )
    augment_brightness: float = setting(
        0.0, "Brightness jitter: a factor in 1 ± this (0: off).", "dataset", minimum=0.0, maximum=1.0
    )
    augment_contrast: float = setting(
        0.0, "Contrast jitter: a factor in 1 ± this (0: off).", "dataset", minimum=0.0, maximum=1.0
    )
    augment_random_crop: float = setting(
        0.0,
        "Random crop: keep a random window of (1 - this) to 1 of each side (0: off).",
        "dataset",
        minimum=0.0,
        maximum=0.5,
    )
    augment_variants: int = setting(
        4,
        "Augmented variants of each image when latents are cached (each encoded once); uncached: new each epoch.",
        "dataset",
        minimum=1,
        maximum=64,
    )

    # --- prior preservation
    with_prior_preservation: bool = setting(
        False, "Train on class images too, so the class keeps its look (prior preservation).", "prior"
    )
    prior_loss_weight: float = setting(1.0, "Weight of the class images' loss.", "prior", minimum=0.0, maximum=100.0)
    num_class_images: int = setting(
        100, "Class images per concept; missing ones are generated first.", "prior", minimum=0, maximum=100000
    )
    sample_batch_size: int = setting(
        4, "Batch size when generating class images and samples.", "prior", minimum=1, maximum=64
    )
    class_inference_steps: int = setting(
        30, "Denoising steps when generating class images.", "prior", minimum=1, maximum=500
    )

    # --- schedule
    seed: int = setting(1234, "Random seed of the run (data order, noise, crops).", "basics", minimum=0)
    train_batch_size: int = setting(1, "Instance images per step.", "basics", minimum=1, maximum=256)
    num_train_epochs: int | None = setting(
        None, "Epochs to train (empty: from max_train_steps).", "basics", minimum=1, maximum=100000
    )
    max_train_steps: int | None = setting(
        None,
        "Optimizer steps to train; wins over epochs (empty with no epochs: 100 per instance image).",
        "basics",
        minimum=1,
    )
    gradient_accumulation_steps: int = setting(
        1, "Batches whose gradients are summed before each optimizer step.", "basics", minimum=1, maximum=1024
    )

    # --- learning rate and optimiser
    learning_rate: float = setting(5e-6, "Learning rate of the UNet.", "optimizer", minimum=0.0, maximum=1.0)
    scale_lr: bool = setting(False, "Multiply the learning rates by batch size x accumulation steps.", "optimizer")
    lr_scheduler: str = setting("constant", "Learning-rate schedule.", "optimizer", choices=SCHEDULERS)
    lr_warmup_steps: int = setting(0, "Steps of linear warm-up from 0.", "optimizer", minimum=0)
    lr_cycles: int = setting(
        1, "Cycles of the cosine_with_restarts schedule.", "optimizer", minimum=1, aliases=("lr_num_cycles",)
    )
    lr_power: float = setting(1.0, "Power of the polynomial schedule.", "optimizer", minimum=0.0, maximum=10.0)
    optimizer: str = setting(
        "adamw",
        "AdamW, or 8-bit AdamW from bitsandbytes (less memory, CUDA).",
        "optimizer",
        choices=("adamw", "adamw_8bit"),
    )
    adam_beta1: float = setting(0.9, "Adam beta1.", "optimizer", minimum=0.0, maximum=0.9999)
    adam_beta2: float = setting(0.999, "Adam beta2.", "optimizer", minimum=0.0, maximum=0.99999)
    adam_weight_decay: float = setting(1e-2, "Adam weight decay.", "optimizer", minimum=0.0, maximum=1.0)
    adam_epsilon: float = setting(1e-8, "Adam epsilon.", "optimizer", minimum=0.0, maximum=1.0)
    max_grad_norm: float = setting(
        1.0, "Clip the gradient norm to this value (0: no clipping).", "optimizer", minimum=0.0
    )

    # --- memory and speed
    mixed_precision: str = setting(
        "no", "Compute in fp16 or bf16 (weights stay fp32).", "memory", choices=("no", "fp16", "bf16")
    )
    gradient_checkpointing: bool = setting(
        False, "Recompute activations in the backward pass: less memory, about 20% slower.", "memory"
    )
    cache_latents: bool = setting(
        True, "Encode each image once with the VAE (in memory and on disk) instead of every step.", "memory"
    )
    attention: str = setting(
        "sdpa", "Attention kernel: PyTorch SDPA, or xformers when installed.", "memory", choices=("sdpa", "xformers")
    )
    low_memory: bool = setting(
        False,
        "One switch for less GPU memory: gradient checkpointing on; on a GPU the VAE and a frozen text encoder "
        "compute the cached latents and text embeddings in the mixed-precision dtype (fp16/bf16; their fp32 weights "
        "are restored after) and then wait on the CPU until samples or saves need them (with cache_latents off the "
        "VAE stays on the GPU in fp32).",
        "memory",
    )
    device: str = setting(
        "auto",
        "Where to train: auto (CUDA when present), cuda, cpu.",
        "memory",
        choices=("auto", "cuda", "cpu"),
        headless_only=True,
    )

    # --- text encoder
    train_text_encoder: bool = setting(False, "Train the text encoder too.", "text_encoder")
    text_encoder_learning_rate: float | None = setting(
        None, "Learning rate of the text encoder (empty: learning_rate).", "text_encoder", minimum=0.0, maximum=1.0
    )
    stop_text_encoder: float = setting(
        1.0, "Fraction of the steps after which the text encoder is frozen.", "text_encoder", minimum=0.0, maximum=1.0
    )
    clip_skip: int = setting(
        1, "Use the output of the N-th last text-encoder layer (1: the last).", "text_encoder", minimum=1, maximum=12
    )

    # --- saving
    save_model_every_n_steps: int = setting(
        0, "Save a checkpoint every N steps (0: only at the end).", "saving", minimum=0, aliases=("save_interval",)
    )
    save_training_state: bool = setting(True, "Keep a resumable training state with the latest checkpoint.", "saving")
    save_total_limit: int = setting(
        0,
        "Keep only the newest N checkpoints of this run (0: keep all); the resumable state's checkpoint always stays.",
        "saving",
        minimum=0,
        maximum=100000,
    )

    # --- samples
    save_sample_prompt: str = setting(
        "", "Prompt of the samples made at each save (empty: each concept's instance prompt).", "samples"
    )
    save_sample_negative_prompt: str = setting("", "Negative prompt of the samples.", "samples")
    n_save_sample: int = setting(1, "Samples per prompt at each save (0: none).", "samples", minimum=0, maximum=64)
    save_infer_steps: int = setting(20, "Denoising steps of the samples.", "samples", minimum=1, maximum=500)
    save_guidance_scale: float = setting(7.5, "Guidance scale of the samples.", "samples", minimum=0.0, maximum=50.0)
    sample_seed: int = setting(42, "Seed of the samples (the same at every save, to compare).", "samples", minimum=0)

    # --- test after saving
    test_prompt: str = setting("", "After each save, generate this prompt (empty: no test).", "samples")
    test_prompts_file: str = setting("", "After each save, generate every line of this text file.", "samples")
    test_negative_prompt: str = setting("", "Negative prompt of the test images.", "samples")
    test_seed: int = setting(0, "Seed of the test images.", "samples", minimum=0)
    test_images_per_prompt: int = setting(1, "Test images per prompt.", "samples", minimum=1, maximum=64)

    # --- logging
    report_to: str = setting(
        "none",
        "Log losses and learning rates to tensorboard or wandb.",
        "logging",
        choices=("none", "tensorboard", "wandb"),
    )
    logging_dir: str = setting("logs", "Log folder (relative paths are inside output_dir).", "logging")

    # ------------------------------------------------------------------------------------------------ derived

    @property
    def has_augmentation(self) -> bool:
        return bool(
            self.augment_rotation or self.augment_brightness or self.augment_contrast or self.augment_random_crop
        )

    @property
    def has_prior_preservation(self) -> bool:
        return self.with_prior_preservation

    def text_encoder_lr(self) -> float:
        return self.learning_rate if self.text_encoder_learning_rate is None else self.text_encoder_learning_rate

    def class_images_for(self, concept: Concept) -> int:
        return self.num_class_images if concept.num_class_images is None else concept.num_class_images

    def effective(self) -> Settings:
        """A copy with the low-memory switch applied to the options it stands for."""
        copy = dataclasses.replace(self, concepts=[dataclasses.replace(c) for c in self.concepts])
        if copy.low_memory:
            copy.gradient_checkpointing = True
        return copy

    # ---------------------------------------------------------------------------------------------- validate

    def validate(self, check_files: bool = True, model_in_memory: bool = False) -> list[str]:
        """Every problem as a sentence; empty when the settings can be used.

        ``model_in_memory``: the base model is given as loaded components, so its path is not checked.
        """
        from .validation import validate_settings

        return validate_settings(self, check_files=check_files, model_in_memory=model_in_memory)

    def raise_if_invalid(self, check_files: bool = True, model_in_memory: bool = False) -> None:
        problems = self.validate(check_files=check_files, model_in_memory=model_in_memory)
        if problems:
            raise SettingsError(problems)

    # ---------------------------------------------------------------------------------------------- files

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"schema_version": SCHEMA_VERSION, **data}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: str | os.PathLike) -> Path:
        from .models.files import atomic_path

        with atomic_path(path) as temp:
            temp.write_text(self.to_json(), encoding="utf-8")
        return Path(path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], base_dir: str | os.PathLike | None = None) -> Settings:
        """Settings from a dict (a JSON file's content), migrated to the current schema.

        Unknown keys are an error (a typo must not be ignored silently); old names are accepted.
        """
        data = migrate(dict(data))
        problems = []
        known = {f.name: f for f in dataclasses.fields(cls)}
        aliases = {a: f.name for f in dataclasses.fields(cls) for a in f.metadata.get("aliases", ())}
        values: dict[str, Any] = {}
        for key, value in data.items():
            name = aliases.get(key, key)
            if name not in known:
                problems.append(f"unknown setting '{key}' (check the spelling; see the README for the list)")
                continue
            values[name] = value
        concepts = values.pop("concepts", [])
        if not isinstance(concepts, list):
            problems.append("'concepts' must be a list of concept objects")
            concepts = []
        parsed = []
        concept_fields = {f.name for f in dataclasses.fields(Concept)}
        for index, item in enumerate(concepts):
            if not isinstance(item, dict):
                problems.append(f"concept {index + 1} must be an object")
                continue
            unknown = sorted(set(item) - concept_fields)
            if unknown:
                problems.append(f"concept {index + 1}: unknown field(s) {', '.join(unknown)}")
            checked = {}
            for spec in dataclasses.fields(Concept):
                if spec.name in item:
                    coerced, problem = _coerce(spec, item[spec.name])
                    if problem:
                        problems.append(f"concept {index + 1}: {problem}")
                    else:
                        checked[spec.name] = coerced
            parsed.append(_resolve_concept_paths(Concept(**checked), base_dir))
        for name, value in list(values.items()):
            coerced, problem = _coerce(known[name], value)
            if problem:
                problems.append(problem)
            else:
                values[name] = coerced
        if problems:
            raise SettingsError(problems)
        return cls(concepts=parsed, **values)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Settings:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SettingsError([f"{path}: cannot read the settings file ({error})"]) from error
        if not isinstance(data, dict):
            raise SettingsError([f"{path}: a settings file holds one JSON object"])
        return cls.from_dict(data, base_dir=path.parent)

    def with_overrides(self, assignments: list[str]) -> Settings:
        """Apply ``key=value`` strings (the CLI's ``--set``); values are parsed as JSON when they can be."""
        data = self.to_dict()
        text_fields = {f.name for f in dataclasses.fields(Settings) if str(f.type).startswith("str")}
        aliases = {a: f.name for f in dataclasses.fields(Settings) for a in f.metadata.get("aliases", ())}
        for assignment in assignments:
            if "=" not in assignment:
                raise SettingsError([f"--set expects key=value, got '{assignment}'"])
            key, text = assignment.split("=", 1)
            key = key.strip()
            if aliases.get(key, key) in text_fields:
                value = text  # text fields take the text as given: --set model_name=2024
            else:
                try:
                    value = json.loads(text)
                except json.JSONDecodeError:
                    value = text
            data[key] = value
        return Settings.from_dict(data)


def _resolve_concept_paths(concept: Concept, base_dir: str | os.PathLike | None) -> Concept:
    if base_dir is None:
        return concept
    for name in ("instance_data_dir", "class_data_dir"):
        value = getattr(concept, name)
        if value and not Path(value).is_absolute():
            setattr(concept, name, str((Path(base_dir) / value).resolve()))
    return concept


def _coerce(spec: dataclasses.Field, value: Any) -> tuple[Any, str | None]:
    """Check one value against its field's type; ints given as whole floats are accepted."""
    kind = spec.type if isinstance(spec.type, str) else getattr(spec.type, "__name__", str(spec.type))
    optional = "None" in kind
    if value is None:
        return (None, None) if optional else (value, f"'{spec.name}' needs a value")
    if kind.startswith("bool"):
        if isinstance(value, bool):
            return value, None
        return value, f"'{spec.name}' must be true or false, not {value!r}"
    if isinstance(value, float) and not math.isfinite(value):
        return value, f"'{spec.name}' must be a finite number, not {value!r}"
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) != int(value):
            return value, f"'{spec.name}' must be a whole number, not {value!r}"
        return int(value), None
    if kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return value, f"'{spec.name}' must be a number, not {value!r}"
        return float(value), None
    if kind.startswith("str"):
        if not isinstance(value, str):
            return value, f"'{spec.name}' must be text, not {value!r}"
        return value, None
    return value, None


# ------------------------------------------------------------------------------------------------- migrations


def _v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v1 had the guide's flat single-concept fields, ``use_8bit_adam`` and ``save_interval``."""
    concept = {}
    for key in ("instance_data_dir", "instance_prompt", "class_data_dir", "class_prompt"):
        if key in data:
            concept[key] = data.pop(key)
    if concept and not data.get("concepts"):
        data["concepts"] = [concept]
    if "use_8bit_adam" in data:
        data["optimizer"] = "adamw_8bit" if data.pop("use_8bit_adam") else "adamw"
    if "enable_xformers_memory_efficient_attention" in data:
        data["attention"] = "xformers" if data.pop("enable_xformers_memory_efficient_attention") else "sdpa"
    if "not_cache_latents" in data:
        data["cache_latents"] = not data.pop("not_cache_latents")
    return data


MIGRATIONS = {1: _v1_to_v2}


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a settings dict from its ``schema_version`` (1 when absent) to :data:`SCHEMA_VERSION`."""
    version = data.pop("schema_version", 1)
    if not isinstance(version, int) or version < 1 or version > SCHEMA_VERSION:
        raise SettingsError(
            [f"schema_version {version!r} is not known to this version (it reads 1 to {SCHEMA_VERSION})"]
        )
    while version < SCHEMA_VERSION:
        data = MIGRATIONS[version](data)
        version += 1
    return data


def concepts_from_list(path: str | os.PathLike) -> list[Concept]:
    """Read the community ``concepts_list.json`` (a list of concept objects; relative paths from its folder)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SettingsError([f"{path}: cannot read the concepts list ({error})"]) from error
    if not isinstance(data, list):
        raise SettingsError([f"{path}: a concepts list is a JSON list of objects"])
    return Settings.from_dict({"schema_version": SCHEMA_VERSION, "concepts": data}, base_dir=path.parent).concepts


def fields() -> list[dataclasses.Field]:
    """The settings fields, in declaration order (concepts is a list of :class:`Concept`)."""
    return list(dataclasses.fields(Settings))
