"""Image augmentation applied before the VAE: random crop, small rotation, brightness and contrast jitter.

Caching stays useful because augmentation comes in *variants*: variant ``v`` of an image is a pure function of
(seed, image content, v).  With cached latents each image has ``augment_variants`` variants, each encoded once and
reused, and every sample picks one; without the cache every sample draws a new variant.  (A flip is handled apart, as
before: it is not exact in latent space either, so each flip of each variant is its own cache entry.)
"""

from __future__ import annotations

import math
import random
from dataclasses import astuple, dataclass
from typing import Any

from PIL import Image, ImageEnhance


@dataclass(frozen=True)
class Augmentation:
    probability: float
    rotation: float  # degrees, either way
    brightness: float  # factor in 1 ± this
    contrast: float
    random_crop: float  # fraction of each side that may be cut away

    @classmethod
    def from_settings(cls, settings: Any) -> Augmentation | None:
        """The run's augmentation, or None when every strength is 0 (then nothing changes, caches included)."""
        if not settings.has_augmentation:
            return None
        return cls(
            settings.augment_probability,
            settings.augment_rotation,
            settings.augment_brightness,
            settings.augment_contrast,
            settings.augment_random_crop,
        )

    def key(self) -> str:
        return "aug" + "-".join(f"{v:g}" for v in astuple(self))

    def apply(self, image: Image.Image, seed: int) -> Image.Image:
        """Variant ``seed`` of ``image`` (before the resize and crop to the training size)."""
        rng = random.Random(seed)
        if self.random_crop and rng.random() < self.probability:
            image = _random_crop(image, rng.uniform(1 - self.random_crop, 1.0), rng)
        if self.rotation and rng.random() < self.probability:
            image = _rotate(image, rng.uniform(-self.rotation, self.rotation))
        if self.brightness and rng.random() < self.probability:
            image = ImageEnhance.Brightness(image).enhance(rng.uniform(1 - self.brightness, 1 + self.brightness))
        if self.contrast and rng.random() < self.probability:
            image = ImageEnhance.Contrast(image).enhance(rng.uniform(1 - self.contrast, 1 + self.contrast))
        return image


def _random_crop(image: Image.Image, scale: float, rng: random.Random) -> Image.Image:
    width, height = image.size
    new_w, new_h = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = rng.randint(0, width - new_w), rng.randint(0, height - new_h)
    return image.crop((left, top, left + new_w, top + new_h))


def _rotate(image: Image.Image, degrees: float) -> Image.Image:
    """Rotate and keep the largest upright rectangle inside, so no empty corner enters the training image."""
    width, height = image.size
    rotated = image.rotate(degrees, resample=Image.BICUBIC, expand=False)
    angle = math.radians(abs(degrees))
    # largest axis-aligned rectangle of the original's aspect ratio inside the rotated image
    scale = 1 / (math.cos(angle) + math.sin(angle) * max(width / height, height / width))
    new_w, new_h = max(1, int(width * scale)), max(1, int(height * scale))
    left, top = (width - new_w) // 2, (height - new_h) // 2
    return rotated.crop((left, top, left + new_w, top + new_h))
