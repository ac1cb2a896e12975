"""Aspect-ratio bucketing: the bucket list, the assignment, batches that never mix buckets, the prior split, and
each ARB setting's effect on a tiny training; augmentation variants and the latent cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from dreambooth.data.augment import Augmentation
from dreambooth.data.buckets import (
    Bucket,
    closest_bucket,
    generate_buckets,
    oriented_size,
    parse_buckets,
)
from dreambooth.data.dataset import BucketPlan, Example
from dreambooth.train.loop import Trainer


def test_the_guides_bucket_list_for_512():
    buckets = generate_buckets(512)
    names = [str(b) for b in buckets]
    assert names[0] == "256x1024" and names[-1] == "1024x256" and "512x512" in names
    assert all(b.width % 64 == 0 and b.height % 64 == 0 for b in buckets)
    assert all(b.width * b.height <= 512 * 512 for b in buckets)
    assert all(Bucket(b.height, b.width) in buckets for b in buckets)  # both orientations
    assert [b.aspect for b in buckets] == sorted(b.aspect for b in buckets)


def test_generated_sides_follow_the_settings():
    assert [str(b) for b in generate_buckets(128, 128, 256)] == ["128x128"]
    assert {str(b) for b in generate_buckets(128, 64, 128)} == {"64x128", "128x64", "128x128"}
    with pytest.raises(ValueError, match="multiples of 64"):
        generate_buckets(512, 100)


@pytest.mark.parametrize(
    ("size", "expected"),
    [((4000, 3000), "576x448"), ((1080, 1920), "384x640"), ((100, 100), "512x512"), ((2000, 1000), "704x320")],
)
def test_an_image_goes_to_the_bucket_of_the_closest_aspect_ratio(size, expected):
    assert str(closest_bucket(*size, generate_buckets(512))) == expected


def test_closest_is_measured_in_log_space():
    buckets = [Bucket(128, 64), Bucket(64, 128)]
    assert closest_bucket(100, 50, buckets) == Bucket(128, 64)
    assert closest_bucket(50, 100, buckets) == Bucket(64, 128)
    assert math.isclose(math.log(2), -math.log(0.5))


def test_custom_bucket_lists():
    assert [str(b) for b in parse_buckets("512x512, 576x448 448x576")] == ["448x576", "512x512", "576x448"]
    for bad in ("512", "500x512", "0x64", ""):
        with pytest.raises(ValueError):
            parse_buckets(bad)


def test_exif_rotation_swaps_the_size(tmp_path):
    path = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[274] = 6  # rotate 90° when shown
    Image.new("RGB", (200, 100)).save(path, exif=exif)
    assert oriented_size(path) == (100, 200)


def _examples(count, concept, is_class=False):
    return [
        Example(Path(f"/c{concept}/{'class' if is_class else 'inst'}{i}.png"), "p", concept, is_class)
        for i in range(count)
    ]


def test_batches_never_mix_buckets_and_each_sample_comes_once_per_epoch():
    instances = [_examples(5, 0), _examples(3, 1)]
    classes = [_examples(4, 0, True), _examples(4, 1, True)]
    wide, tall = Bucket(128, 64), Bucket(64, 128)
    bucket_of = {e.path: (wide if i % 2 else tall) for group in instances for i, e in enumerate(group)}
    plan = BucketPlan(instances, classes, seed=3, hflip=True, bucket_of=bucket_of, batch_size=2)
    per_epoch = int(plan.batches_per_epoch(2))
    seen = []
    for batch_index in range(per_epoch):
        batch = plan.batch(batch_index, 2)
        assert len({bucket_of[s.instance.path] for s in batch}) == 1
        assert all(s.prior is not None and s.prior.concept == s.instance.concept for s in batch)
        assert plan.epoch_of_batch(batch_index, 2) == 0
        seen.extend(s.index for s in batch)
    assert sorted(seen) == list(range(plan.epoch_length))  # every sample of the epoch once
    assert plan.epoch_of_batch(per_epoch, 2) == 1
    again = BucketPlan(instances, classes, seed=3, hflip=True, bucket_of=bucket_of, batch_size=2)
    assert [s.index for s in again.batch(per_epoch + 1, 2)] == [s.index for s in plan.batch(per_epoch + 1, 2)]


@pytest.fixture
def shapes_folder(tmp_path):
    """Instance images of three shapes: wide 3:1, tall 1:3 and square."""
    from conftest import draw_subject

    folder = tmp_path / "shapes"
    for name, size in (("wide", (192, 64)), ("tall", (64, 192)), ("square", (96, 96))):
        draw_subject(folder / name, count=2, size=size, seed=len(name))
    return folder


def _buckets_json(out: Path) -> dict:
    return json.loads((out / "buckets.json").read_text())


def test_training_with_mixed_aspect_ratios_batch_2_and_prior(make_settings, shapes_folder, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    shapes, masks = [], []
    forward = UNet2DConditionModel.forward
    monkeypatch.setattr(
        UNet2DConditionModel,
        "forward",
        lambda self, x, *a, **k: shapes.append(tuple(x.shape)) or forward(self, x, *a, **k),
    )
    import dreambooth.train.loop as loop

    combine = loop.combine_losses
    monkeypatch.setattr(
        loop, "combine_losses", lambda per, mask, *rest: masks.append(mask.tolist()) or combine(per, mask, *rest)
    )
    settings = make_settings(
        concept={"instance_data_dir": str(shapes_folder)},
        resolution=128,
        use_aspect_ratio_bucket=True,
        debug_arb=True,
        train_batch_size=2,
        with_prior_preservation=True,
        max_train_steps=4,
    )
    trainer = Trainer(settings)
    result = trainer.run()
    assert result.step == 4
    report = _buckets_json(Path(settings.output_dir))
    assert report["counts"]["192x64"] == 2 and report["counts"]["64x192"] == 2
    assert report["counts"]["128x128"] == 2 + 2  # the squares and the generated class images
    assert {(s[2], s[3]) for s in shapes} >= {(8, 24), (24, 8)}  # latents of wide and tall buckets
    # the prior split follows the roles, whatever forward passes the shapes needed: [inst, prior, inst, prior]
    assert all(mask == [False, True] * (len(mask) // 2) for mask in masks)


def test_instance_and_prior_loss_stay_separate_with_different_shapes(make_settings, shapes_folder):
    """Per-sample losses from separate forward passes combine as instance mean + weight x prior mean."""
    from dreambooth.train.loss import combine_losses

    per_sample = torch.tensor([1.0, 10.0, 3.0, 30.0])
    mask = torch.tensor([False, True, False, True])
    total, instance, prior = combine_losses(per_sample, mask, 0.5)
    assert instance.item() == 2.0 and prior.item() == 20.0 and total.item() == 12.0


def test_use_aspect_ratio_bucket_changes_the_training(train_shapes):
    square, bucketed = train_shapes(), train_shapes(use_aspect_ratio_bucket=True)
    assert square != bucketed


def test_bucket_settings_change_the_assignment(train_shapes, tmp_path):
    default = train_shapes(use_aspect_ratio_bucket=True, debug_arb=True, out="a")
    assert default.counts["192x64"] == 2
    custom = train_shapes(use_aspect_ratio_bucket=True, debug_arb=True, aspect_buckets="128x128", out="b")
    assert custom.counts == {"128x128": 6}
    smallest = train_shapes(use_aspect_ratio_bucket=True, debug_arb=True, bucket_min_side=128, out="c")
    assert smallest.counts == {"128x128": 6}
    largest = train_shapes(use_aspect_ratio_bucket=True, debug_arb=True, bucket_max_side=128, out="d")
    assert largest.counts["128x64"] == 2 and largest.counts["64x128"] == 2
    quiet = train_shapes(use_aspect_ratio_bucket=True, out="e")
    assert quiet.counts is None  # debug_arb off: no buckets.json
    assert not any(line.startswith("bucket ") for line in quiet.log) and any(
        line.startswith("bucket ") for line in default.log
    )


@pytest.fixture
def train_shapes(make_settings, shapes_folder, tmp_path):
    import hashlib

    from dreambooth.events import Callbacks

    def digest(tensors):
        h = hashlib.sha256()
        for key in sorted(tensors):
            h.update(tensors[key].detach().float().numpy().tobytes())
        return h.hexdigest()

    class Log(Callbacks):
        def __init__(self):
            self.lines = []

        def on_log(self, message):
            self.lines.append(message)

    class Outcome(str):
        counts: dict | None
        log: list

    def run(out="run", **changes):
        settings = make_settings(
            concept={"instance_data_dir": str(shapes_folder)},
            resolution=128,
            output_dir=str(tmp_path / out),
            **changes,
        )
        log = Log()
        trainer = Trainer(settings, callbacks=log)
        trainer.run()
        outcome = Outcome(digest(trainer.components.unet.state_dict()))
        path = Path(settings.output_dir) / "buckets.json"
        outcome.counts = json.loads(path.read_text())["counts"] if path.is_file() else None
        outcome.log = log.lines
        return outcome

    return run


def test_invalid_bucket_settings_are_reported(make_settings):
    problems = make_settings(use_aspect_ratio_bucket=True, aspect_buckets="512x500").validate()
    assert any("aspect-ratio buckets" in p and "multiples of 8" in p for p in problems)
    problems = make_settings(use_aspect_ratio_bucket=True, bucket_min_side=100).validate()
    assert any("multiples of 64" in p for p in problems)


def test_augmentation_variants_are_deterministic_and_change_the_image():
    image = Image.new("RGB", (96, 64), (40, 90, 200))
    image.paste((250, 20, 20), (10, 10, 40, 40))
    augmentation = Augmentation(1.0, 15.0, 0.4, 0.4, 0.3)
    a, b = augmentation.apply(image, 1), augmentation.apply(image, 1)
    assert a.tobytes() == b.tobytes()
    assert augmentation.apply(image, 2).tobytes() != a.tobytes()
    assert a.tobytes() != image.tobytes()
    off = Augmentation(0.0, 15.0, 0.4, 0.4, 0.3)  # probability 0: nothing happens
    assert off.apply(image, 1).tobytes() == image.tobytes()


def test_cached_augmentation_encodes_each_variant_once(make_settings, monkeypatch):
    import dreambooth.data.cache as cache

    calls = []
    original = cache.latent_distribution
    monkeypatch.setattr(cache, "latent_distribution", lambda vae, x: calls.append(1) or original(vae, x))
    settings = make_settings(augment_rotation=10.0, augment_probability=1.0, augment_variants=3, max_train_steps=6)
    Trainer(settings).run()
    assert len(calls) == 3 * 3  # three images, three variants each, whatever the steps


def test_resume_with_buckets_and_augmentation_is_exact(make_settings, shapes_folder, tmp_path):
    from dreambooth.events import Callbacks, Commands

    common = {
        "concept": {"instance_data_dir": str(shapes_folder)},
        "resolution": 128,
        "use_aspect_ratio_bucket": True,
        "train_batch_size": 2,
        "max_train_steps": 6,
        "hflip": True,
        "augment_rotation": 10.0,
        "augment_variants": 2,
    }
    straight = Trainer(make_settings(output_dir=str(tmp_path / "straight"), **common))
    straight.run()

    class CancelAtThree(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == 3:
                commands.cancel()

    commands = Commands()
    split = make_settings(output_dir=str(tmp_path / "split"), **common)
    interrupted = Trainer(split, callbacks=CancelAtThree(), commands=commands).run()
    assert interrupted.cancelled and interrupted.step == 3
    resumed = Trainer(
        make_settings(output_dir=str(tmp_path / "split"), resume_from=str(interrupted.state_dir), **common)
    )
    assert resumed.run().step == 6
    a, b = straight.components.unet.state_dict(), resumed.components.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
