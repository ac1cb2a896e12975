"""Shared fixtures: tiny checkpoints built once per session, offline."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest

from dreambooth.models.tiny import write_tiny_checkpoint

VARIANTS = {
    "sd1": {"family": "sd1"},
    "sd2-v": {"family": "sd2"},
    "sd2-eps": {"family": "sd2", "prediction_type": "epsilon"},
    "sd1-inpainting": {"family": "sd1", "inpainting": True},
    # the real SD UNet's shape (two resnets per level, attention on all but the last): LoRA files are named for it
    "sd1-sd": {"family": "sd1", "layout": "sd"},
    "sd2-v-sd": {"family": "sd2", "layout": "sd"},
    "sdxl": {"family": "sdxl"},  # SDXL's shape at a test size (models/tiny.py: tiny_sdxl_architecture)
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A folder with one tiny single-file checkpoint (+ sidecar yaml) per variant."""
    directory = tmp_path_factory.mktemp("tiny-models")
    for name, options in VARIANTS.items():
        write_tiny_checkpoint(directory, name=f"tiny-{name}", **options)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_dir):
    """``tiny_checkpoint("sd1")`` -> path of that variant's .safetensors."""

    def get(variant: str):
        return tiny_dir / f"tiny-{variant}.safetensors"

    return get


def draw_subject(folder, count=3, size=(64, 64), seed=0, captions=None):
    """Small PNGs of a red ring on varied backgrounds; ``captions`` writes IMAGE.txt beside each."""
    import random

    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
        draw = ImageDraw.Draw(image)
        x, y = rng.randrange(size[0] // 2), rng.randrange(size[1] // 2)
        draw.ellipse((x, y, x + size[0] // 3, y + size[1] // 3), fill=(220, 20, 30))
        path = folder / f"img_{index}.png"
        image.save(path)
        if captions:
            path.with_suffix(".txt").write_text(captions[index % len(captions)])
        paths.append(path)
    return paths


@pytest.fixture
def make_settings(tiny_checkpoint, tmp_path):
    """``make_settings(**changes)``: settings of a 2-step tiny run at 64 px with one concept."""
    from dreambooth.settings import Concept, Settings

    instance = tmp_path / "instance"
    if not instance.exists():
        draw_subject(instance, count=3, size=(96, 64), captions=["a red ring on grass", "a red ring on sand"])

    def make(concept=None, **changes):
        values = {
            "pretrained_model_name_or_path": str(tiny_checkpoint("sd1")),
            "output_dir": str(tmp_path / "out"),
            "resolution": 64,
            "max_train_steps": 2,
            "learning_rate": 1e-3,
            "n_save_sample": 0,
            "save_infer_steps": 2,
            "class_inference_steps": 2,
            "num_class_images": 2,
            "sample_batch_size": 2,
            "device": "cpu",
        }
        values.update(changes)
        concept_values = {
            "instance_data_dir": str(instance),
            "instance_prompt": "photo of zwx ring",
            "class_data_dir": str(tmp_path / "class"),
            "class_prompt": "photo of a ring",
        }
        concept_values.update(concept or {})
        return Settings(concepts=[Concept(**concept_values)], **values)

    return make


def agreement_settings(work, resolution: int, **changes):
    """Settings of a 2-step CPU run on two drawn images and two class images under ``work`` (prior on), with
    ``changes``: the runs the memory estimate is compared with (tests/test_memory.py, tests/test_bench_memory.py)."""
    import dataclasses

    from dreambooth.demo import draw_instance_images
    from dreambooth.settings import Concept, Settings

    instance, prior = work / "instance", work / "class"
    draw_instance_images(instance, count=2, size=resolution, seed=1)
    draw_instance_images(prior, count=2, size=resolution, seed=2)
    settings = Settings(
        pretrained_model_name_or_path="in-memory",
        output_dir=str(work / "out"),
        resolution=resolution,
        max_train_steps=2,
        center_crop=True,
        with_prior_preservation=True,
        n_save_sample=0,
        save_training_state=False,
        device="cpu",
        num_class_images=2,
        concepts=[
            Concept(
                instance_data_dir=str(instance),
                instance_prompt="photo of zwx ring",
                class_data_dir=str(prior),
                class_prompt="photo of a ring",
            )
        ],
    )
    return dataclasses.replace(settings, **changes)
