"""Class images: made in the run's mixed precision, in batches, kept image by image across a cancel and a restart."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dreambooth.data.class_images import generate_class_images
from dreambooth.events import Callbacks
from dreambooth.models.components import load_components
from dreambooth.train.loop import Trainer


def test_class_images_are_made_under_the_runs_autocast_in_batches(make_settings, tiny_checkpoint):
    settings = make_settings(
        with_prior_preservation=True, num_class_images=3, sample_batch_size=2, mixed_precision="bf16"
    )
    components = load_components(tiny_checkpoint("sd1"))
    phase = {"now": None}
    seen = []

    class Phase(Callbacks):
        def on_progress(self, progress):
            phase["now"] = progress.phase

    def record(module, args):
        if phase["now"] == "class_images":
            seen.append((len(args[0]), torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    components.unet.register_forward_pre_hook(record)
    Trainer(settings, callbacks=Phase(), components=components).run()
    assert len(list(Path(settings.concepts[0].class_data_dir).glob("*.png"))) == 3
    assert seen, "the UNet ran while class images were made"
    assert all(enabled and dtype == torch.bfloat16 for _, enabled, dtype in seen)
    # sample_batch_size 2: a batch of 2 then 1, each with and without the prompt (classifier-free guidance)
    assert sorted({size for size, _, _ in seen}) == [2, 4]


def pngs(folder) -> dict:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_class_images_are_kept_one_by_one_and_a_restart_makes_only_the_missing(tiny_checkpoint, tmp_path):
    components = load_components(tiny_checkpoint("sd1"))
    options = {"seed": 7, "steps": 2, "guidance_scale": 7.5, "resolution": 64, "batch_size": 1}
    straight = tmp_path / "straight"
    generate_class_images(components, straight, "photo of a ring", "", 4, **options)
    expected = pngs(straight)
    assert len(expected) == 4

    split = tmp_path / "split"
    made = []
    first = generate_class_images(
        components,
        split,
        "photo of a ring",
        "",
        4,
        should_stop=lambda: len(made) >= 2,
        on_progress=lambda done, total: made.append(done) if done else None,
        **options,
    )
    assert len(first) == 2 and len(pngs(split)) == 2  # cancelled after two: two files, each complete
    assert not list(split.glob(".*"))  # no temporary files left behind
    second = generate_class_images(components, split, "photo of a ring", "", 4, **options)
    assert len(second) == 2  # only the missing ones
    resumed = pngs(split)
    assert sorted(resumed) == sorted(expected)
    # the same images the uninterrupted run made: no duplicate, none missing
    assert all(np.array_equal(resumed[name], expected[name]) for name in expected)
    assert len({image.tobytes() for image in resumed.values()}) == 4
