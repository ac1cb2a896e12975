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
