"""The demo shows DreamBooth learning the subject, and prints nothing but its own lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.demo import RESOLUTION, nearest_training_distance

REPOSITORY = Path(__file__).resolve().parent.parent
FAST = ["--steps", "400", "--vae-steps", "300"]  # fewer steps than the default run; still enough to show the subject
OURS = re.compile(r"^(\[\d/5\] |      \S)")  # "[k/5] stage" lines and their indented details


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-output"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPOSITORY)}
    env.pop("PYTHONWARNINGS", None)
    run = subprocess.run(
        [sys.executable, "-m", "dreambooth", "demo", "--out", str(out), *FAST],
        capture_output=True,
        text=True,
        env=env,
        cwd=out.parent,
        timeout=900,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return out, run


def _images(folder: Path) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in sorted(folder.glob("*.png"))]


@pytest.mark.slow
def test_samples_after_training_show_the_subject(demo_run):
    out, _ = demo_run
    comparison = out / "output" / "before_after.png"
    with Image.open(comparison) as image:  # training images on top, then four rows of before | after pairs
        assert image.width >= 4 * RESOLUTION and image.height >= 4 * 2 * RESOLUTION
    training = _images(out / "data" / "instance")
    before = nearest_training_distance(_images(out / "output" / "samples" / "step_000000"), training)
    after = nearest_training_distance(_images(out / "output" / "samples" / "step_000400"), training)
    assert after < 0.9 * before  # the samples came clearly closer to the training images
    assert (out / "output" / "loss.png").is_file()


@pytest.mark.slow
def test_the_demo_prints_only_its_own_lines(demo_run):
    _, run = demo_run
    assert run.stderr == ""  # no library warnings, no progress bars
    foreign = [line for line in run.stdout.splitlines() if not OURS.match(line)]
    assert foreign == []
    assert "distance to the nearest training image" in run.stdout
