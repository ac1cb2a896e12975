"""The training metadata of a LoRA file: kohya sd-scripts' ``ss_*`` keys (what the WebUI's Lora card and its
metadata dialog show, and what other tools read) and ours (``dreambooth.*``).  Every value is a string.

The WebUI decides a LoRA's model version from ``ss_base_model_version`` (``sdxl_...``) and ``ss_v2`` ("True": SD 2);
it hides a card whose version differs from the loaded model's, so an SD 2 LoRA must say ``ss_v2 = "True"`` and an
SDXL LoRA ``sdxl_base_v1-0`` (kohya's name of SDXL base; an SDXL file carries no ``ss_v2``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

NETWORK_MODULE = "lycoris.kohya"  # LyCORIS's kohya-compatible network, the name its files carry
HASH_CHUNK = 16 * 2**20


SDXL_VERSION = "sdxl_base_v1-0"  # kohya's ss_base_model_version of SDXL base and its fine-tunes (v-prediction too)


def base_model_version(arch: Any) -> str:
    """kohya's name of the base model's version: ``sd_v1``, ``sd_v2``, with ``_v`` for v-prediction;
    ``sdxl_base_v1-0`` for SDXL."""
    if arch.family == "sdxl":
        return SDXL_VERSION
    name = "sd_v2" if arch.family == "sd2" else "sd_v1"
    return name + ("_v" if arch.is_v_prediction else "")


def version_metadata(arch: Any) -> dict[str, str]:
    """``ss_base_model_version``, and ``ss_v2`` for SD 1.x / 2.x (the keys the WebUI reads the version from)."""
    metadata = {"ss_base_model_version": base_model_version(arch)}
    if arch.family != "sdxl":
        metadata["ss_v2"] = str(arch.family == "sd2")
    return metadata


def tag_frequency(examples: list[Any], folder_of: dict[int, str]) -> dict[str, dict[str, int]]:
    """``{folder: {tag: count}}``: each example's prompt split at commas into tags (kohya's captions), counted per
    instance folder name (``folder_of``: concept index -> folder name)."""
    counts: dict[str, Counter] = {}
    for example in examples:
        tags = [tag.strip() for tag in example.prompt.split(",") if tag.strip()]
        counts.setdefault(folder_of[example.concept], Counter()).update(tags)
    return {folder: dict(counter.most_common()) for folder, counter in counts.items()}


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes (hex): kohya's ``ss_new_sd_model_hash`` of the base model file."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def network_metadata(
    settings: Any,
    requested: Any,
    arch: Any,
    *,
    step: int,
    total_steps: int,
    instances: list[list[Any]],
    classes: list[list[Any]] | None,
    started_at: float,
    finished_at: float,
    base_model_hash: str | None = None,
    learning_rates: tuple[float, float] | None = None,
) -> dict[str, str]:
    """The metadata of the LoRA file of ``step``.

    ``settings``: the run's effective settings; ``requested``: as the user gave them (saved whole, for a rerun);
    ``arch``: the base model's architecture; ``instances`` / ``classes``: the run's examples per concept;
    ``started_at`` / ``finished_at``: unix seconds; ``base_model_hash``: the base file's sha256 when it is a file;
    ``learning_rates``: (UNet, text encoder) as trained (scale_lr applied), default the settings'.
    """
    s = settings
    unet_lr, text_lr = learning_rates or (s.network_unet_lr, s.network_text_encoder_lr)
    folder_of = {index: Path(concept.instance_data_dir).name for index, concept in enumerate(s.concepts)}
    train_images = [e for group in instances for e in group]
    reg_images = [e for group in classes or [] for e in group]
    conv_alpha = s.network_conv_alpha or s.network_conv_rank
    args = {"algo": s.training_method, "conv_dim": str(s.network_conv_rank), "conv_alpha": f"{conv_alpha:g}"}
    if s.network_dropout:
        args["dropout"] = f"{s.network_dropout:g}"
    dataset_dirs = {
        folder_of[index]: {"n_repeats": 1, "img_count": len(group)} for index, group in enumerate(instances) if group
    }
    metadata = {
        "ss_output_name": s.model_name,
        "ss_sd_model_name": Path(s.pretrained_model_name_or_path).name if s.pretrained_model_name_or_path else "",
        **version_metadata(arch),
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(s.network_rank),
        "ss_network_alpha": f"{s.network_alpha or s.network_rank:g}",
        "ss_network_dropout": f"{s.network_dropout:g}",
        "ss_network_args": json.dumps(args),
        "ss_resolution": f"({s.resolution}, {s.resolution})",
        "ss_clip_skip": str(s.clip_skip),
        "ss_learning_rate": f"{unet_lr:g}",
        "ss_unet_lr": f"{unet_lr:g}",
        "ss_text_encoder_lr": f"{text_lr:g}" if s.network_train_text_encoder else "0",
        "ss_lr_scheduler": s.lr_scheduler,
        "ss_lr_warmup_steps": str(s.lr_warmup_steps),
        "ss_max_train_steps": str(total_steps),
        "ss_steps": str(step),
        "ss_batch_size_per_device": str(s.train_batch_size),
        "ss_gradient_accumulation_steps": str(s.gradient_accumulation_steps),
        "ss_gradient_checkpointing": str(bool(s.gradient_checkpointing)),
        "ss_num_train_images": str(len(train_images)),
        "ss_num_reg_images": str(len(reg_images)),
        "ss_tag_frequency": json.dumps(tag_frequency(train_images, folder_of)),
        "ss_dataset_dirs": json.dumps(dataset_dirs),
        "ss_training_started_at": repr(float(started_at)),
        "ss_training_finished_at": repr(float(finished_at)),
        "ss_seed": str(s.seed),
        "ss_mixed_precision": s.mixed_precision,
        "ss_optimizer": s.optimizer,
        "ss_prior_loss_weight": f"{s.prior_loss_weight:g}" if s.has_prior_preservation else "0",
        "ss_cache_latents": str(bool(s.cache_latents)),
        "ss_flip_aug": str(bool(s.hflip)),
        "ss_enable_bucket": str(bool(s.use_aspect_ratio_bucket)),
        "dreambooth.step": str(step),
        "dreambooth.base_model": s.pretrained_model_name_or_path,
        "dreambooth.settings": requested.to_json(),
    }
    if base_model_hash:
        metadata["ss_new_sd_model_hash"] = base_model_hash
    return metadata
