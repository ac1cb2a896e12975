"""Masked loss (issue 16): IMAGE.mask.png beside an instance image weighs its loss (data/loss_masks.py).

The loss term against hand-computed values; the mask lined up with the training pixels through every transform
(EXIF rotation, augmentation, bucket / square resize and crop, random and centre crop, flip) in the trainer's own
cached and uncached paths; pixels under black changing nothing exactly (with a model whose outputs are local: with
the real VAE and UNet every latent depends on every pixel, through attention, so "nothing" holds for the loss term);
an all-white mask training exactly as no mask; masks never taken as images; the alpha-channel dataset tool.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import draw_subject
from PIL import Image, ImageDraw

from dreambooth.data.augment import Augmentation
from dreambooth.data.buckets import Bucket
from dreambooth.data.cache import ContentHashes, LatentCache, pixels
from dreambooth.data.dataset import Example, Sample
from dreambooth.data.images import list_images, load_image
from dreambooth.data.loss_masks import (
    LossMasks,
    check_masks,
    latent_weights,
    mask_file,
    mask_pixels,
    write_alpha_masks,
)
from dreambooth.errors import DreamBoothError
from dreambooth.train.loop import Trainer
from dreambooth.train.loss import masked_mean, sample_losses

# ------------------------------------------------------------------------------------------- the loss term


def test_masked_mean_by_hand():
    per_element = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]]])  # (1, 2, 2, 2)
    weights = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])  # (1, 1, 2, 2): the same over both channels
    # sum(l w) = 1 + 1.5 + 5 + 3.5 = 11 over 2 channels x sum(w) = 1.5 -> 11 / 3
    assert masked_mean(per_element, weights).tolist() == pytest.approx([11 / 3])
    assert masked_mean(per_element, None).tolist() == [4.5]
    assert masked_mean(per_element, torch.zeros(1, 1, 2, 2)).tolist() == [0.0]  # all black: 0, not 0/0


def test_sample_losses_with_weights_by_hand():
    prediction = torch.zeros(2, 1, 1, 2)
    target = torch.tensor([[[[3.0, 1.0]]], [[[4.0, 2.0]]]])
    weights = torch.tensor([[[[1.0, 0.0]]], [[[0.25, 0.75]]]])
    # l2: sample 0 keeps only 9; sample 1: (16 x 0.25 + 4 x 0.75) / (0.25 + 0.75) = 7
    assert sample_losses(prediction, target, "l2", weights=weights).tolist() == pytest.approx([9.0, 7.0])
    # huber with c = 1: 2(sqrt(d² + 1) - 1) -> sample 0: 2(sqrt(10) - 1)
    huber = sample_losses(prediction, target, "huber", torch.tensor([1.0, 1.0]), weights)
    expected_1 = 0.25 * 2 * (17**0.5 - 1) + 0.75 * 2 * (5**0.5 - 1)
    assert huber.tolist() == pytest.approx([2 * (10**0.5 - 1), expected_1])


def test_latent_weights_are_the_area_average_with_the_unmasked_weight():
    mask = torch.zeros(1, 16, 16)
    mask[:, :, :12] = 1.0  # white on the left 12 of 16 columns
    assert latent_weights(mask, (2, 2)).tolist() == [[[1.0, 0.5], [1.0, 0.5]]]
    # black weighs 0.25; a half-white cell 0.5 + 0.25 x 0.5
    assert latent_weights(mask, (2, 2), 0.25).tolist() == [[[1.0, 0.625], [1.0, 0.625]]]
    assert torch.equal(latent_weights(torch.ones(1, 64, 48), (8, 6), 0.3), torch.ones(1, 8, 6))


def test_the_unmasked_weight_setting_reaches_the_trainers_weights(make_settings, tmp_path):
    (image,) = draw_subject(tmp_path / "set", count=1, size=(64, 64))
    mask = Image.new("L", (64, 64), 255)
    mask.paste(0, (0, 0, 32, 64))  # black on the left half
    mask.save(mask_file(image))
    for weight in (0.0, 0.25):
        trainer = trainer_with(make_settings, tmp_path, tmp_path / "set", masked_loss_unmasked_weight=weight)
        weights = LossMasks(trainer, [image]).weights(Example(image, "p", 0, False), False, 0, 0, (4, 8, 8))
        assert torch.equal(weights[:, :, :4], torch.full((1, 8, 4), weight))
        assert torch.equal(weights[:, :, 4:], torch.ones(1, 8, 4))


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_an_all_white_mask_is_exactly_no_mask(loss_type):
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(3, 4, 8, 6, generator=generator, requires_grad=True)
    target = torch.randn(3, 4, 8, 6, generator=generator)
    c = torch.tensor([0.1, 0.2, 0.3])
    plain = sample_losses(prediction, target, loss_type, c)
    (plain_grad,) = torch.autograd.grad(plain.sum(), prediction)
    white = latent_weights(torch.ones(1, 64, 48), (8, 6))[None].expand(3, 1, 8, 6)
    masked = sample_losses(prediction, target, loss_type, c, white)
    (masked_grad,) = torch.autograd.grad(masked.sum(), prediction)
    assert torch.equal(plain, masked) and torch.equal(plain_grad, masked_grad)


def test_the_black_region_changes_nothing_in_the_loss_term():
    generator = torch.Generator().manual_seed(1)
    prediction = torch.randn(2, 4, 8, 8, generator=generator)
    target = torch.randn(2, 4, 8, 8, generator=generator)
    weights = torch.ones(2, 1, 8, 8)
    weights[:, :, :, :3] = 0.0  # black: the left three latent columns

    def loss_and_grad(pred, targ):
        pred = pred.clone().requires_grad_(True)
        loss = sample_losses(pred, targ, "l2", weights=weights).sum()
        return loss, torch.autograd.grad(loss, pred)[0]

    loss, grad = loss_and_grad(prediction, target)
    changed_pred, changed_target = prediction.clone(), target.clone()
    changed_pred[..., :3] += 5.0
    changed_target[..., :3] -= 3.0
    loss_black, grad_black = loss_and_grad(changed_pred, changed_target)
    assert torch.equal(loss, loss_black) and torch.equal(grad, grad_black)
    assert torch.count_nonzero(grad[..., :3]) == 0  # nothing pulls the prediction under black
    changed_pred[..., 5] += 1.0  # under white
    assert not torch.equal(loss, loss_and_grad(changed_pred, changed_target)[0])


# ------------------------------------------------------------------------------------------- geometry


def grey_picture(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A grey picture with shapes and a gradient (no symmetry); the same picture as an image and as its mask."""
    rng = random.Random(seed)
    width, height = size
    gradient = np.add.outer(np.linspace(0, 120, height), np.linspace(0, 100, width)).astype(np.uint8)
    picture = Image.fromarray(gradient, "L")
    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x, y, x + width // 4, y + height // 5), fill=rng.choice((0, 255, 190)))
    draw.rectangle((0, 0, width // 6, height // 3), fill=255)  # a corner mark: flips and rotations show
    picture.convert(mode).save(path)
    return path


TRANSFORMS = {
    "center crop": {"size": 64, "center_crop": True, "flip": False, "augmentation": None},
    "random crop, flip": {"size": 64, "center_crop": False, "flip": True, "augmentation": None},
    "bucket, flip": {"size": (96, 48), "center_crop": False, "flip": True, "augmentation": None},
    "augmentation": {
        "size": 64,
        "center_crop": False,
        "flip": True,
        "augmentation": Augmentation(1.0, 15.0, 0.0, 0.0, 0.3),  # rotation and random crop
    },
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_the_mask_lines_up_with_the_pixels_exactly(name, tmp_path):
    """The image and its mask are the same grey picture: the mask must come out equal to the pixels, pixel for
    pixel, through every transform."""
    options = TRANSFORMS[name]
    image = grey_picture(tmp_path / "photo.png", (150, 110), seed=3)
    mask = grey_picture(mask_file(image), (150, 110), seed=3, mode="L")
    for seed in range(4):
        expected = (pixels(image, crop_seed=seed, augment_seed=seed + 10, **options)[:1] + 1) / 2
        got = mask_pixels(mask, crop_seed=seed, augment_seed=seed + 10, **options)
        assert torch.equal(got, expected)
    if options["augmentation"] is not None:  # other seeds draw other crops: the test can see a wrong seed
        other = mask_pixels(mask, crop_seed=0, augment_seed=99, **options)
        assert not torch.equal(other, (pixels(image, crop_seed=0, augment_seed=10, **options)[:1] + 1) / 2)


def test_colour_jitter_leaves_the_mask_alone_and_the_geometry_the_same(tmp_path):
    """With brightness and contrast on, the pixels are an affine function of the mask (the jitter), up to rounding:
    the same crop and rotation drawn from the same seed; the mask keeps its white and black."""
    image = grey_picture(tmp_path / "photo.png", (150, 110), seed=4)
    mask = grey_picture(mask_file(image), (150, 110), seed=4, mode="L")
    for path in (image, mask):  # grey levels 40-180: the jitter never clips
        Image.eval(Image.open(path), lambda v: 40 + v * 140 // 255).save(path)
    jitter = Augmentation(1.0, 15.0, 0.2, 0.2, 0.3)
    for seed in range(4):
        options = {"size": 64, "center_crop": False, "flip": True, "crop_seed": seed, "augment_seed": seed + 10}
        image_values = ((pixels(image, augmentation=jitter, **options)[0] + 1) * 127.5).flatten().double()
        mask_values = (mask_pixels(mask, augmentation=jitter, **options)[0] * 255).flatten().double()
        design = torch.stack([mask_values, torch.ones_like(mask_values)], dim=1)
        solution = torch.linalg.lstsq(design, image_values[:, None]).solution
        residual = (design @ solution)[:, 0] - image_values
        assert residual.abs().max() < 4.0  # grey levels (rounding in the jitter); a shifted crop is off by far more
        plain = mask_pixels(mask, augmentation=dataclasses.replace(jitter, brightness=0.0, contrast=0.0), **options)
        assert torch.equal(mask_pixels(mask, augmentation=jitter, **options), plain)


def trainer_with(make_settings, tmp_path, folder, **changes):
    settings = make_settings(
        concept={"instance_data_dir": str(folder)}, output_dir=str(tmp_path / "out"), masked_loss=True, **changes
    )
    trainer = Trainer(settings)
    trainer.log = lambda message: None
    return trainer


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("bucket", [False, True], ids=["square", "bucket"])
def test_the_trainer_gives_each_latent_the_mask_of_its_own_crop(make_settings, tmp_path, cached, bucket):
    """The weights of a sample are the area average of exactly the pixels its latent is made from
    (``Trainer._pixels``: the latent cache's crop, or a new crop each epoch), variant and flip included."""
    folder = tmp_path / "set"
    folder.mkdir()
    paths = [grey_picture(folder / f"p{i}.png", (150, 110), seed=i) for i in range(2)]
    for i, path in enumerate(paths):
        grey_picture(mask_file(path), (150, 110), seed=i, mode="L")
    trainer = trainer_with(
        make_settings,
        tmp_path,
        folder,
        center_crop=False,
        hflip=True,
        augment_rotation=10.0,
        augment_random_crop=0.2,
        augment_probability=1.0,
        augment_variants=3,
        cache_latents=cached,
    )
    if bucket:
        trainer.bucket_of = {path: Bucket(96, 48) for path in paths}
    if cached:
        s = trainer.settings
        vae = torch.nn.Conv2d(3, 4, 1)  # the cache's key names the VAE; nothing is encoded here
        trainer.latent_cache = LatentCache(
            trainer.contents, vae, s.resolution, s.center_crop, s.seed, None, trainer.augmentation
        )
    masks = LossMasks(trainer, paths)
    for index in range(6):
        example = Example(paths[index % 2], "photo of zwx", 0, False)
        flip, epoch = index % 3 == 0, index // 2
        image = trainer._pixels(example, flip, index, epoch)
        grid = (image.shape[1] // 8, image.shape[2] // 8)
        expected = latent_weights((image[:1] + 1) / 2, grid)
        assert torch.equal(masks.weights(example, flip, index, epoch, (4, *grid)), expected)
    assert masks.weights(Example(paths[0], "photo of a ring", 0, True), False, 0, 0, (4, *grid)) is None  # class


def test_an_exif_rotated_transparent_photo_and_its_alpha_mask_stay_aligned(tmp_path):
    """A transparent PNG stored sideways with EXIF orientation 6: the tool's mask is upright, as the pixels are."""
    stored = Image.new("RGBA", (60, 90), (0, 0, 0, 0))
    ImageDraw.Draw(stored).polygon([(5, 5), (50, 20), (10, 80)], fill=(200, 30, 40, 255))  # no symmetry
    exif = Image.Exif()
    exif[274] = 6
    image = tmp_path / "set" / "sideways.png"
    image.parent.mkdir()
    stored.save(image, exif=exif)
    report = write_alpha_masks(tmp_path / "set")
    assert report.written == [mask_file(image)]
    mask = Image.open(mask_file(image))
    assert mask.mode == "L" and mask.size == (90, 60)  # upright, as load_image turns the pixels
    upright = np.asarray(load_image(image, background=(255, 255, 255)))
    opaque = np.asarray(mask) == 255
    assert opaque.any() and (~opaque).any()
    assert (upright[opaque] == (200, 30, 40)).all() and (upright[np.asarray(mask) == 0] == 255).all()
    for seed in range(3):  # and through the training transforms (away from the edges, where resampling blends)
        options = {"size": (64, 48), "center_crop": False, "flip": bool(seed % 2), "crop_seed": seed}
        trained = (pixels(image, **options) + 1) * 127.5
        weights = mask_pixels(mask_file(image), **options)
        pool = torch.nn.functional.max_pool2d
        inside, outside = pool(1 - weights, 7, 1, 3)[0] == 0, pool(weights, 7, 1, 3)[0] == 0
        assert inside.sum() > 100 and outside.sum() > 100
        assert torch.allclose(trained[:, outside], torch.tensor(255.0), atol=1e-3)
        assert torch.allclose(trained[:, inside], torch.tensor([200.0, 30.0, 40.0])[:, None], atol=1e-3)


# ------------------------------------------------------------------------------------------- in the trainer


class PatchVAE(torch.nn.Module):
    """A stand-in VAE whose latent cell (i, j) is made from the image's 8x8 patch (i, j) only."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, kernel_size=8, stride=8)
        self.config = types.SimpleNamespace(scaling_factor=0.18215)

    def encode(self, image):
        mean = self.conv(image)
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mean=mean, std=torch.full_like(mean, 0.1)))


class PointwiseUNet(torch.nn.Module):
    """A stand-in UNet whose prediction at a latent cell depends on that cell only (a 1x1 convolution)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.conv = torch.nn.Conv2d(4, 4, kernel_size=1)

    def forward(self, sample, timestep, encoder_hidden_states=None):
        return types.SimpleNamespace(sample=self.conv(sample))


def local_trainer(make_settings, tmp_path, folder, paths, cached, contents, **changes):
    """``contents``: the content hashes the seeds come from, kept when the pixels change (else the crop would)."""
    from diffusers import DDPMScheduler

    trainer = trainer_with(make_settings, tmp_path, folder, cache_latents=cached, **changes)
    trainer.contents = contents
    trainer.components = types.SimpleNamespace(
        noise_scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        vae=PatchVAE(),
        unet=PointwiseUNet(),
        arch=types.SimpleNamespace(is_inpainting=False, is_sdxl=False),
    )
    trainer.text_cache = {"photo of zwx ring": torch.zeros(77, 8)}
    if changes.get("use_aspect_ratio_bucket"):
        trainer.bucket_of = {path: Bucket(128, 64) for path in paths}
    if cached:
        s = trainer.settings
        trainer.latent_cache = LatentCache(
            trainer.contents, trainer.components.vae, s.resolution, s.center_crop, s.seed, None, trainer.augmentation
        )
    trainer.loss_masks = LossMasks(trainer, paths)
    return trainer


def loss_and_gradient(trainer, path, flip, index):
    unet = trainer.components.unet
    unet.zero_grad()
    sample = Sample(index, Example(path, "photo of zwx ring", 0, False), None, flip)
    loss, _, _ = trainer._loss([sample], 0, False, torch.device("cpu"), contextlib.nullcontext())
    loss.backward()
    return loss.detach(), unet.conv.weight.grad.clone()


LOCAL_CASES = {
    # image size, black columns of the mask, columns changed under black, columns changed under white, settings
    "random crop, flip": ((80, 64), 40, (0, 16), (60, 76), {"center_crop": False, "hflip": True}),
    "bucket": ((160, 80), 96, (0, 40), (120, 150), {"use_aspect_ratio_bucket": True, "aspect_buckets": "128x64"}),
    "augmentation": (
        (128, 128),
        64,
        (16, 36),
        (80, 100),
        {"augment_rotation": 10.0, "augment_random_crop": 0.2, "augment_probability": 1.0, "hflip": True},
    ),
}


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("case", list(LOCAL_CASES))
def test_pixels_under_black_change_nothing_and_under_white_change_the_loss(make_settings, tmp_path, case, cached):
    """With a model whose outputs are local, changing the image's pixels where the mask is black leaves the loss and
    every gradient bit for bit the same, through the trainer's crop, bucket, augmentation and flip; changing pixels
    under white changes them.  (A misaligned mask, e.g. one not flipped with the image, puts changed pixels under
    white.)"""
    size, black, under_black, under_white, changes = LOCAL_CASES[case]
    folder = tmp_path / "set"
    folder.mkdir()
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    mask = np.full((size[1], size[0]), 255, dtype=np.uint8)
    mask[:, :black] = 0
    path = folder / "photo.png"
    Image.fromarray(mask).save(mask_file(path))
    rows = slice(size[1] // 2 - 10, size[1] // 2 + 10)
    contents = ContentHashes()

    def losses(array):
        Image.fromarray(array).save(path)
        trainer = local_trainer(make_settings, tmp_path, folder, [path], cached, contents, **changes)
        return [loss_and_gradient(trainer, path, flip, index) for index, flip in ((0, False), (1, True), (2, True))]

    reference = losses(picture)
    changed = picture.copy()
    changed[rows, under_black[0] : under_black[1]] = 255 - changed[rows, under_black[0] : under_black[1]]
    for (loss, grad), (other_loss, other_grad) in zip(reference, losses(changed)):
        assert torch.equal(loss, other_loss) and torch.equal(grad, other_grad)
    changed = picture.copy()
    changed[rows, under_white[0] : under_white[1]] = 255 - changed[rows, under_white[0] : under_white[1]]
    assert all(not torch.equal(a[0], b[0]) for a, b in zip(reference, losses(changed)))


# ------------------------------------------------------------------------------------------- whole runs


def copy_with_masks(source: Path, target: Path, draw) -> list[Path]:
    target.mkdir()
    paths = []
    for image in list_images(source):
        copy = target / image.name
        copy.write_bytes(image.read_bytes())
        with Image.open(copy) as opened:
            mask = Image.new("L", opened.size, 255)
        draw(ImageDraw.Draw(mask), mask.size)
        mask.save(mask_file(copy))
        paths.append(copy)
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
def test_a_run_with_white_masks_trains_exactly_as_without_and_black_changes_it(make_settings, tmp_path, cached):
    """Prior preservation on (class images have no mask), random crops and flips: all-white masks give the very
    weights of a run without masked loss; masks with a black half give others."""
    common = {
        "with_prior_preservation": True,
        "center_crop": False,
        "hflip": True,
        "cache_latents": cached,
        "save_training_state": False,
    }
    instance = tmp_path / "instance"
    make_settings()  # draws the instance images
    white = copy_with_masks(instance, tmp_path / "white", lambda draw, size: None)
    copy_with_masks(instance, tmp_path / "half", lambda draw, size: draw.rectangle((0, 0, size[0] // 2, size[1]), 0))

    def unet(folder, name, **changes):
        settings = make_settings(
            concept={"instance_data_dir": str(folder), "class_data_dir": str(tmp_path / "class")},
            output_dir=str(tmp_path / name),
            **common,
            **changes,
        )
        trainer = Trainer(settings)
        trainer.run()
        return trainer.components.unet.state_dict()

    plain = unet(instance, "plain")
    masked_white = unet(tmp_path / "white", "white", masked_loss=True)
    assert all(torch.equal(plain[k], masked_white[k]) for k in plain)
    assert len(list_images(white[0].parent)) == 3  # the masks were not trained as images
    half = unet(tmp_path / "half", "half", masked_loss=True)
    assert not all(torch.equal(plain[k], half[k]) for k in plain)
    assert all(torch.equal(plain[k], v) for k, v in unet(tmp_path / "half", "off").items())  # off: masks unused


def test_unusable_masks_are_refused_with_a_sentence_naming_the_file(make_settings, tmp_path):
    folder = tmp_path / "set"
    images = draw_subject(folder, count=5, size=(96, 64))
    Image.new("L", (64, 96), 255).save(mask_file(images[0]))  # sideways
    Image.new("RGB", (96, 64), (255, 0, 0)).save(mask_file(images[1]))  # colour
    Image.new("LA", (96, 64), (255, 0)).save(mask_file(images[2]))  # transparency
    Image.new("L", (96, 64), 0).save(mask_file(images[3]))  # all black
    mask_file(images[4]).write_bytes(b"not a png")
    problems = {p.path.name: p.reason for p in check_masks(images, 0.0)}
    assert "draw it over the image as it is shown (EXIF rotation applied)" in problems["img_0.mask.png"]
    assert "64x96 but img_0.png is 96x64" in problems["img_0.mask.png"]
    assert "in colour" in problems["img_1.mask.png"]
    assert "transparency" in problems["img_2.mask.png"]
    assert "all black" in problems["img_3.mask.png"] and "would train nothing" in problems["img_3.mask.png"]
    assert "not an image file" in problems["img_4.mask.png"]
    assert "img_3.mask.png" not in {p.path.name for p in check_masks(images, 0.1)}  # black weighs 0.1: it trains
    with pytest.raises(DreamBoothError, match=r"5 mask\(s\) cannot be used") as error:
        trainer_with(make_settings, tmp_path, folder).run()  # refused before the first step
    assert str(mask_file(images[0])) in str(error.value) and "Traceback" not in str(error.value)


# ------------------------------------------------------------------------------------------- files and tools


def test_masks_are_never_taken_as_training_images(make_settings, tmp_path):
    from dreambooth.data.captioning import images_to_caption
    from dreambooth.data.captions import folder_captions
    from dreambooth.data.class_images import usable_class_images
    from dreambooth.data.dataset import class_examples, instance_examples

    folder = tmp_path / "set"
    images = draw_subject(folder, count=2, size=(64, 64))
    for image in images:
        Image.new("L", (64, 64), 255).save(mask_file(image))
    Image.new("L", (64, 64), 255).save(folder / "IMG.MASK.PNG")  # any case
    assert list_images(folder) == images
    settings = make_settings(
        concept={"instance_data_dir": str(folder), "class_data_dir": str(folder)}, with_prior_preservation=True
    )
    concept = settings.concepts[0]
    assert [e.path for e in instance_examples(settings, 0, concept)] == images
    assert [e.path for e in class_examples(settings, 0, concept)] == images
    assert usable_class_images(folder, concept.class_prompt) == images
    assert [path for path, _ in folder_captions(folder)] == images
    assert images_to_caption(folder) == images


def test_the_alpha_tool_writes_masks_atomically_and_keeps_existing_ones(tmp_path):
    folder = tmp_path / "set"
    (folder / "sub").mkdir(parents=True)
    cut_out = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    ImageDraw.Draw(cut_out).ellipse((5, 5, 30, 25), fill=(10, 200, 10, 255))
    cut_out.putpixel((0, 0), (10, 200, 10, 128))  # half transparent: grey
    cut_out.save(folder / "sub" / "cut.png")
    Image.new("RGBA", (40, 30), (1, 2, 3, 255)).save(folder / "opaque.png")  # alpha, but nothing transparent
    Image.new("RGB", (40, 30)).save(folder / "plain.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    report = write_alpha_masks(folder)
    target = folder / "sub" / "cut.mask.png"
    assert report.written == [target]
    assert sorted(p.name for p in report.opaque) == ["opaque.png", "plain.jpg"]
    assert [p.name for p, _ in report.unreadable] == ["broken.png"]
    mask = np.asarray(Image.open(target))
    assert np.array_equal(mask, np.asarray(cut_out.getchannel("A")))
    assert mask[0, 0] == 128 and mask[15, 17] == 255 and mask[29, 39] == 0
    assert sorted(p.name for p in folder.rglob("*")) == sorted(
        ["sub", "cut.png", "cut.mask.png", "opaque.png", "plain.jpg", "broken.png"]
    )  # no temporary file left, nothing else written

    Image.new("L", (40, 30), 255).save(target)  # the user's own mask
    again = write_alpha_masks(folder)
    assert again.written == [] and again.kept == [folder / "sub" / "cut.png"]
    assert np.asarray(Image.open(target)).min() == 255 and "kept" in again.summary()
    assert write_alpha_masks(folder, overwrite=True).written == [target]
    assert np.array_equal(np.asarray(Image.open(target)), np.asarray(cut_out.getchannel("A")))
    with pytest.raises(DreamBoothError, match="folder does not exist"):
        write_alpha_masks(tmp_path / "missing")


def test_cli_masks_command(tmp_path, capsys):
    from dreambooth.cli import main

    cut_out = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    cut_out.paste((9, 9, 9, 255), (5, 5, 15, 15))
    (tmp_path / "set").mkdir()
    cut_out.save(tmp_path / "set" / "a.png")
    assert main(["masks", str(tmp_path / "set")]) == 0
    assert "1 mask(s) written" in capsys.readouterr().out
    assert (tmp_path / "set" / "a.mask.png").is_file()
    assert main(["masks", str(tmp_path / "nowhere")]) == 2


def test_prepare_crops_a_mask_with_its_image(tmp_path):
    """The dataset tool's crop and scale carry IMAGE.mask.png along: the same window, the same size."""
    from dreambooth.data.prepare import prepare_folder

    source = tmp_path / "raw"
    source.mkdir()
    image = grey_picture(source / "photo.png", (150, 110), seed=5)
    grey_picture(mask_file(image), (150, 110), seed=5, mode="L")
    other = grey_picture(source / "other.png", (150, 110), seed=6)
    Image.new("L", (110, 150), 255).save(mask_file(other))  # sideways: reported, not copied
    report = prepare_folder(source, tmp_path / "ready", size=64, crop="entropy")
    (prepared,) = [p for p in report.written if p.mask is not None]
    assert prepared.mask == tmp_path / "ready" / "photo.mask.png"
    pixels_out = np.asarray(Image.open(prepared.output).convert("L"))
    assert np.array_equal(np.asarray(Image.open(prepared.mask)), pixels_out)  # the same picture, the same crop
    assert not (tmp_path / "ready" / "other.mask.png").exists()
    assert any("other.mask.png: the mask is 110x150" in line and "not copied" in line for line in report.problems())
    assert "1 mask(s) cropped with their image" in report.summary()
