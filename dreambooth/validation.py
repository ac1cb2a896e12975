"""Checks of a :class:`~dreambooth.settings.Settings`: each problem is returned as a sentence a user can act on."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .settings import Settings


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
                problems.append(f"{prefix}{spec.name} is '{value}'; it must be one of: {allowed}")
            if isinstance(value, (int, float)):
                if meta.get("minimum") is not None and value < meta["minimum"]:
                    problems.append(f"{prefix}{spec.name} is {value}; it must be at least {meta['minimum']}")
                if meta.get("maximum") is not None and value > meta["maximum"]:
                    problems.append(f"{prefix}{spec.name} is {value}; it must be at most {meta['maximum']}")
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

    return len(list_images(folder)) if folder and Path(folder).is_dir() else 0


def validate_settings(settings: Settings, check_files: bool = True, model_in_memory: bool = False) -> list[str]:
    s = settings
    problems = _bounds(s)
    if s.resolution % 8:
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
    if not s.model_name or any(c in s.model_name for c in '/\\:*?"<>|'):
        problems.append(f"model_name '{s.model_name}' must be a plain file name (no folders or special characters)")
    for name in ("tensorboard", "wandb"):
        if s.report_to == name and importlib.util.find_spec(name) is None:
            problems.append(
                f"report_to {name} needs the {name} package, which is not installed: "
                f"'pip install {name}', or set report_to none"
            )
    if s.mixed_precision == "fp16" and s.device == "cpu":
        problems.append("mixed_precision fp16 needs a CUDA GPU; on the CPU use bf16 or no")
    if s.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(
            "optimizer adamw_8bit needs the bitsandbytes package, which is not installed: "
            "'pip install bitsandbytes' (CUDA GPUs), or choose adamw"
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
            if not Path(concept.instance_data_dir).is_dir():
                problems.append(f"{where}: instance_data_dir '{concept.instance_data_dir}' is not a folder")
            else:
                found = count_images(concept.instance_data_dir)
                total_instance += found
                if not found:
                    problems.append(f"{where}: no images (png, jpg, jpeg, webp, bmp) in '{concept.instance_data_dir}'")
        if s.with_prior_preservation:
            if not concept.class_prompt.strip():
                problems.append(f"{where}: prior preservation needs a class_prompt (e.g. 'photo of a dog')")
            if not concept.class_data_dir:
                problems.append(f"{where}: prior preservation needs a class_data_dir (generated images go there)")
            elif check_files and Path(concept.class_data_dir).exists() and not Path(concept.class_data_dir).is_dir():
                problems.append(f"{where}: class_data_dir '{concept.class_data_dir}' is a file, not a folder")
    if check_files and total_instance and s.train_batch_size > total_instance:
        problems.append(
            f"train_batch_size is {s.train_batch_size} but there are only {total_instance} instance images: "
            "lower the batch size or add images"
        )
    if check_files:
        names = ["pretrained_vae_name_or_path", "test_prompts_file"]
        if not model_in_memory:
            names.insert(0, "pretrained_model_name_or_path")
        for name in names:
            value = getattr(s, name)
            if value and not Path(value).exists():
                problems.append(f"{name}: '{value}' does not exist")
        if s.resume_from:
            from .train.state import find_state

            if find_state(s.resume_from) is None:
                problems.append(
                    f"resume_from: '{s.resume_from}' is not a training state folder (no complete state.json in it, "
                    "nor in a 'state' folder of a run in it)"
                )
    return problems
