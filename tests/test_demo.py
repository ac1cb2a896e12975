"""The demo shows DreamBooth learning the subject, and prints nothing but its own lines."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dreambooth.demo import RESOLUTION, subject_share

REPOSITORY = Path(__file__).resolve().parent.parent
FAST = ["--steps", "300", "--vae-steps", "200"]  # fewer steps than the default run; still enough to show the subject
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
    training = subject_share(_images(out / "data" / "instance"))
    before = subject_share(_images(out / "output" / "samples" / "step_000000"))
    after = subject_share(_images(out / "output" / "samples" / "step_000300"))
    assert 0.15 < training < 0.45  # the subject's red and yellow cover a good part of each training image
    assert abs(after - training) < abs(before - training)  # the samples moved towards the subject's colours
    assert after > 2 * before and after > 0.05
    assert (out / "output" / "loss.png").is_file()


@pytest.mark.slow
def test_the_demo_prints_only_its_own_lines(demo_run):
    _, run = demo_run
    assert run.stderr == ""  # no library warnings, no progress bars
    foreign = [line for line in run.stdout.splitlines() if not OURS.match(line)]
    assert foreign == []
    assert "pixels in the subject's red and yellow" in run.stdout
