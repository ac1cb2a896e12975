"""Masked loss: a grey-scale mask beside an instance image weighs the loss of each pixel of that image.

``IMAGE.mask.png`` beside ``IMAGE.ext``: white trains, black is ignored (weighs ``masked_loss_unmasked_weight``),
grey weighs in between.  The mask is drawn over the image as it is shown (EXIF rotation applied; what an editor
shows) and has the image's size.  (The random masks of inpainting models are another thing: data/masks.py.)

The mask follows the image exactly: it goes through :func:`~.cache.pixels` itself, with the image's crop and
augmentation seeds.  Every geometric step there (the augmentation's random crop and rotation, the bucket or square
resize and crop, the flip) is a pure function of the seed and the image size, which mask and image share, so the two
come out aligned pixel for pixel.  Only the colour jitter (brightness, contrast) is left out; its draws come after
the geometric ones, so leaving it out changes none of them.  The mask is then area-averaged to the latent grid and
weighs the per-element loss before each sample's mean (train/loss.py: ``masked_mean``).  Class images have no mask.

The dataset tool :func:`write_alpha_masks` makes the masks of transparent images from their alpha channel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DreamBoothError
from .images import _ALPHA_MODES, MASK_SUFFIX, ImageError, ImageProblem, list_images, load_image


def mask_file(image: Path) -> Path:
    """Where the mask of ``image`` is: ``IMAGE.mask.png`` beside ``IMAGE.ext``."""
    image = Path(image)
    return image.with_name(image.stem + MASK_SUFFIX)


def _has_transparency(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as opened:
        return opened.mode in _ALPHA_MODES or "transparency" in opened.info


def check_mask(image: Path, unmasked_weight: float) -> str:
    """'' when the mask of ``image`` (if any) can be used, else the reason (what is wrong with the mask file
    :func:`mask_file` and what to do)."""
    import numpy as np

    from .buckets import oriented_size

    path = mask_file(image)
    if not path.is_file():
        return ""
    try:
        mask = load_image(path)
    except ImageError as error:
        return error.reason
    with mask:
        values = np.asarray(mask)
        size = mask.size
    try:
        if _has_transparency(path):
            return "the mask has transparency; save it grey-scale without alpha (white = train, black = ignore)"
        shown = oriented_size(image)
    except Exception as error:  # the image itself is checked (and reported) by check_images
        return f"cannot be compared with {image.name} ({error})"
    if size != shown:
        hint = "draw it over the image as it is shown (EXIF rotation applied)" if size == shown[::-1] else "resize it"
        return f"the mask is {size[0]}x{size[1]} but {image.name} is {shown[0]}x{shown[1]}; {hint}"
    if not ((values[..., 0] == values[..., 1]).all() and (values[..., 1] == values[..., 2]).all()):
        return "the mask is in colour; save it grey-scale (white = train, black = ignore, grey in between)"
    if unmasked_weight == 0 and values.max() == 0:
        return (
            f"the mask is all black, so {image.name} would train nothing (masked_loss_unmasked_weight is 0); "
            "paint the part to learn white, or remove the image"
        )
    return ""


def check_masks(images: Iterable[Path], unmasked_weight: float) -> list[ImageProblem]:
    """One :class:`ImageProblem` (naming the mask file) per unusable mask of ``images``; [] when all are fine."""
    problems = []
    for image in images:
        reason = check_mask(image, unmasked_weight)
        if reason:
            problems.append(ImageProblem(mask_file(image), reason))
    return problems


def mask_pixels(
    mask: Path,
    size: int | tuple[int, int],
    center_crop: bool,
    flip: bool,
    crop_seed: int,
    augmentation: Any = None,
    augment_seed: int = 0,
) -> Any:
    """The (1, H, W) mask in [0, 1] (1: white) that lines up with ``pixels(IMAGE, size, ...)`` of the same
    arguments (the image's seeds); see the module's docstring for why it lines up."""
    from .cache import pixels

    geometry = None
    if augmentation is not None:
        geometry = dataclasses.replace(augmentation, brightness=0.0, contrast=0.0)
    grey = pixels(mask, size, center_crop, flip, crop_seed, geometry, augment_seed)
    return (grey[:1] + 1.0) / 2.0  # exactly 0 for black and 1 for white


def latent_weights(mask: Any, grid: tuple[int, int], unmasked_weight: float = 0.0) -> Any:
    """The (1, h, w) loss weights on the latent ``grid`` (h, w): the mask's area average over each latent cell,
    then ``unmasked_weight`` for black, 1 for white, linear in between (white gives exactly 1)."""
    import torch

    area = torch.nn.functional.interpolate(mask[None].float(), size=tuple(grid), mode="area")[0]
    return area + unmasked_weight * (1.0 - area)


def stack_weights(weights: list[Any]) -> Any:
    """The (B, 1, h, w) weights of a group of samples of one shape; None (the plain loss) when no sample has a
    mask, else ones for the samples without."""
    import torch

    present = [w for w in weights if w is not None]
    if not present:
        return None
    return torch.stack([torch.ones_like(present[0]) if w is None else w for w in weights])


class LossMasks:
    """The masked loss of a run: which instance images have a mask (checked once), and each sample's weights with
    the crop, augmentation variant and flip its latent has (train/loop.py calls :meth:`weights`)."""

    def __init__(self, trainer: Any, images: list[Path]):
        self.trainer = trainer
        self.unmasked_weight = trainer.settings.masked_loss_unmasked_weight
        problems = check_masks(images, self.unmasked_weight)
        if problems:
            lines = "\n".join(f"  {p.path}: {p.reason}" for p in problems)
            raise DreamBoothError(f"{len(problems)} mask(s) cannot be used; fix or remove them:\n{lines}")
        self.files = {path: mask_file(path) for path in images if mask_file(path).is_file()}
        self.memory: dict[Any, Any] = {}  # cached latents: one crop per (image, flip, size, variant)
        trainer.log(f"masked loss: {len(self.files)} of {len(images)} instance images have a mask")

    def weights(self, example: Any, flip: bool, sample_index: int, epoch: int, latent_shape: Any) -> Any:
        """(1, h, w) weights of the example's latent (``latent_shape`` (C, h, w)), or None: no mask (class images,
        images without one).  The seeds are the ones the latent's pixels were made with (train/loop.py
        ``Trainer._pixels``; tests/test_masked_loss.py checks that they agree)."""
        from .dataset import mix_seed

        path = example.path
        if example.is_class or path not in self.files:
            return None
        trainer, s = self.trainer, self.trainer.settings
        size, variant = trainer._size(example), trainer._variant(sample_index)
        grid = tuple(latent_shape[-2:])
        cache = trainer.latent_cache
        if cache is not None:  # the cached latent's one crop per (image, flip, size, variant)
            key = (cache.key(path, flip, size, variant), grid)
            if key not in self.memory:
                mask = mask_pixels(
                    self.files[path],
                    size or cache.resolution,
                    cache.center_crop,
                    flip,
                    cache.crop_seed(path),
                    cache.augmentation,
                    cache.augment_seed(path, variant),
                )
                self.memory[key] = latent_weights(mask, grid, self.unmasked_weight)
            return self.memory[key]
        content = trainer.contents.get(path)
        mask = mask_pixels(
            self.files[path],
            size or s.resolution,
            s.center_crop,
            flip,
            mix_seed(s.seed, "crop", content, epoch),
            trainer.augmentation,
            mix_seed(s.seed, "augment", content, "sample", variant),
        )
        return latent_weights(mask, grid, self.unmasked_weight)


# --- dataset tool: masks from transparency ---------------------------------------------------------------------


@dataclass
class AlphaMaskReport:
    """What :func:`write_alpha_masks` did: ``written`` masks; ``kept``: images whose mask exists (not overwritten);
    ``opaque``: images without transparency (no mask needed); ``unreadable``: (image, reason)."""

    folder: Path
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    opaque: list[Path] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.folder}: {len(self.written)} mask(s) written from transparency"]
        if self.kept:
            lines.append(f"{len(self.kept)} image(s) already have a mask, kept (overwrite to replace them)")
        if self.opaque:
            lines.append(f"{len(self.opaque)} image(s) have no transparency: no mask needed")
        lines.extend(f"  {path}: {reason}" for path, reason in self.unreadable)
        return "\n".join(lines)


def alpha_mask(path: Path) -> Any:
    """The alpha channel of ``path`` as an ``L`` image, upright (EXIF rotation applied, as :func:`load_image` turns
    the pixels), or None when the image has no transparent pixel."""
    from PIL import Image, ImageOps

    load_image(path).close()  # every check of a training image first (size, truncation, ...): ImageError
    with Image.open(path) as opened:
        if opened.mode not in _ALPHA_MODES and "transparency" not in opened.info:
            return None
        opened.load()
        upright = ImageOps.exif_transpose(opened)
        alpha = upright.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] == 255:
        return None
    return alpha


def write_alpha_masks(folder: Any, overwrite: bool = False) -> AlphaMaskReport:
    """Write ``IMAGE.mask.png`` (the alpha channel: opaque = white = train) beside every transparent image under
    ``folder`` (recursive), atomically; an existing mask is kept unless ``overwrite``.  Raises
    :class:`DreamBoothError` when ``folder`` is not a folder or a mask cannot be written."""
    from ..models.files import atomic_path

    report = AlphaMaskReport(Path(folder))
    for image in list_images(folder):
        target = mask_file(image)
        try:
            alpha = alpha_mask(image)
        except ImageError as error:
            report.unreadable.append((image, error.reason))
            continue
        except Exception as error:  # a format plugin can raise almost anything on odd data
            report.unreadable.append((image, f"cannot read its transparency ({error})"))
            continue
        if alpha is None:
            report.opaque.append(image)
        elif target.exists() and not overwrite:
            report.kept.append(image)
        else:
            try:
                with atomic_path(target) as temp:
                    alpha.save(temp, format="PNG")
            except OSError as error:
                raise DreamBoothError(
                    f"{target}: cannot be written ({error.strerror or error}); check the folder's permissions and "
                    "free space"
                ) from error
            report.written.append(target)
    return report
