"""Finding, opening, checking and resizing training images.

Every image goes through :func:`load_image`, which turns whatever the user dropped in a folder (CMYK JPEGs, 16-bit
PNGs, transparent logos, rotated phone photos) into a plain 8-bit RGB image, or raises :class:`ImageError` naming the
file and the reason. Nothing here changes Pillow's global settings.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import DreamBoothError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})
MAX_PIXELS = 8192 * 8192  # larger images are refused as possible decompression bombs
MASK_SUFFIX = ".mask.png"  # IMAGE.mask.png beside IMAGE.ext: the image's loss mask (data/loss_masks.py), no image

_ALPHA_MODES = frozenset({"RGBA", "LA", "PA", "RGBa", "La"})
_HIGH_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class ImageError(DreamBoothError):
    """An image file that cannot be used; ``str(error)`` is ``"PATH: REASON"``."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True)
class ImageProblem:
    """One file :func:`check_images` found unusable; ``reason`` is a plain sentence."""

    path: Path
    reason: str


def list_images(folder) -> list[Path]:
    """Image files under ``folder`` (recursive), sorted by path string.

    A file counts when its suffix, in any case, is one of :data:`IMAGE_SUFFIXES`. Hidden files and folders (names
    starting with ``.``) below ``folder`` are skipped, and so are loss masks (names ending in :data:`MASK_SUFFIX`).
    Raises :class:`DreamBoothError` when ``folder`` is not a folder.
    """
    root = Path(folder)
    if not root.is_dir():
        reason = "is a file, not a folder" if root.exists() else "folder does not exist"
        raise DreamBoothError(f"{root}: {reason}")
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        found.extend(
            Path(dirpath, name)
            for name in filenames
            if not name.startswith(".")
            and Path(name).suffix.lower() in IMAGE_SUFFIXES
            and not name.lower().endswith(MASK_SUFFIX)
        )
    return sorted(found, key=str)


def _open_reason(exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return "file does not exist"
    if isinstance(exc, IsADirectoryError):
        return "is a folder, not an image file"
    if isinstance(exc, PermissionError):
        return "cannot be read (permission denied)"
    return f"cannot be read ({exc.strerror or exc})"


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit / 32-bit / float single-channel image to 8-bit ``L`` (Pillow's own convert clips instead)."""
    values = np.asarray(image).astype(np.float64)
    if values.size == 0:
        return Image.new("L", image.size)
    low, high = float(values.min()), float(values.max())
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and high <= 65535):
        low, high = 0.0, 65535.0  # 16-bit data (Pillow < 10 opens 16-bit PNGs as mode "I")
    elif image.mode == "F" and low >= 0 and high <= 1:
        low, high = 0.0, 1.0
    scale = 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(np.clip(np.rint((values - low) * scale), 0, 255).astype(np.uint8))


def _to_rgb(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Any decoded image -> RGB, compositing transparency over ``background``."""
    if image.mode in _HIGH_BIT_MODES:
        image = _to_8bit(image)
    if image.mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        base = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(base, rgba).convert("RGB")
    if image.mode == "RGB":
        return image
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, L, 1, P without transparency


def load_image(path, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Open ``path`` as a fully decoded 8-bit RGB image, upright as the camera meant it.

    ``background`` is the RGB colour transparent areas are composited over. Raises :class:`ImageError` for a missing,
    empty, unreadable, truncated or non-image file, or one with more than :data:`MAX_PIXELS` pixels (checked from the
    header, before decoding).
    """
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(path, "is empty (0 bytes)")
    except OSError as exc:
        raise ImageError(path, _open_reason(exc)) from exc
    too_large = "is too large to be a training image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            opened = Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"{too_large} (refused as a possible decompression bomb)") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(path, "is not an image file (unrecognised format or corrupt header)") from exc
    except OSError as exc:
        raise ImageError(path, _open_reason(exc)) from exc
    except Exception as exc:  # a damaged header can make a format plugin raise almost anything
        raise ImageError(path, "cannot be read as an image (corrupt header)") from exc
    with opened:
        width, height = opened.size
        if width * height > MAX_PIXELS:
            raise ImageError(path, f"{too_large}: {width}x{height} is more than {MAX_PIXELS} pixels")
        try:
            opened.load()
        except Exception as exc:  # truncated data: OSError, SyntaxError, ValueError, EOFError, struct.error, ...
            raise ImageError(path, "cannot be read as an image (truncated or corrupt file)") from exc
        try:
            image = ImageOps.exif_transpose(opened)
        except Exception:  # broken EXIF must not make a good picture unusable: keep it as stored
            image = opened
        image = _to_rgb(image, background)
        if image is opened:
            image = opened.copy()  # closing the file invalidates the opened image
    return image


def check_images(paths, min_size: int = 0) -> list[ImageProblem]:
    """Fully decode every file in ``paths`` and return one :class:`ImageProblem` per unusable file.

    ``min_size``: images whose shorter side is below this many pixels are reported as too small (0: no limit).
    Returns ``[]`` when every file is fine.
    """
    problems = []
    for path in paths:
        try:
            with load_image(path) as image:
                width, height = image.size
        except ImageError as exc:
            problems.append(ImageProblem(Path(path), exc.reason))
            continue
        if min(width, height) < min_size:
            reason = f"too small: {width}x{height}, the shorter side is below {min_size} px"
            problems.append(ImageProblem(Path(path), reason))
    return problems


@dataclass(frozen=True)
class Crop:
    """Where a training image's pixels came from, in pixels: the image's size before resizing (``original``, height
    and width, after EXIF rotation and augmentation), its size once scaled to cover the target (``resized``), the
    crop's top-left corner in the resized image (``top``, ``left``; mirrored when the crop is flipped, so it
    describes the pixels actually seen) and the target size (``target``, height and width).  SDXL is conditioned on
    (original, top-left, target): see :meth:`time_ids`."""

    original: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int
    target: tuple[int, int]

    def flipped(self) -> Crop:
        """The same crop of the horizontally flipped image."""
        left = self.resized[1] - self.left - self.target[1]
        return dataclasses.replace(self, left=left)

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's six size conditionings: (original height, original width, crop top, crop left, target height,
        target width), in the order of diffusers' ``add_time_ids`` and Stability's sgm."""
        return (*self.original, self.top, self.left, *self.target)

    def as_list(self) -> list[int]:
        return [*self.original, *self.resized, self.top, self.left, *self.target]

    @classmethod
    def from_list(cls, values: list[int]) -> Crop:
        oh, ow, rh, rw, top, left, th, tw = (int(v) for v in values)
        return cls((oh, ow), (rh, rw), top, left, (th, tw))


def plan_crop(
    image_size: tuple[int, int],
    size: int | tuple[int, int],
    center_crop: bool = True,
    rng: random.Random | None = None,
) -> Crop:
    """The :class:`Crop` :func:`resize_and_crop` takes from an image of ``image_size`` (width, height); the random
    offset (``center_crop`` False) is drawn from ``rng`` exactly as there."""
    target_w, target_h = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if target_w <= 0 or target_h <= 0:
        raise ValueError(f"target size must be positive, got {size!r}")
    if not center_crop and rng is None:
        raise ValueError("resize_and_crop: rng is required when center_crop is False")
    width, height = image_size
    scale = max(target_w / width, target_h / height)
    new_w = max(target_w, round(width * scale))
    new_h = max(target_h, round(height * scale))
    if center_crop:
        left, top = (new_w - target_w) // 2, (new_h - target_h) // 2
    else:
        left, top = rng.randint(0, new_w - target_w), rng.randint(0, new_h - target_h)
    return Crop((height, width), (new_h, new_w), top, left, (target_h, target_w))


def resize_and_crop(
    image: Image.Image,
    size: int | tuple[int, int],
    center_crop: bool = True,
    rng: random.Random | None = None,
    crop: Crop | None = None,
) -> Image.Image:
    """Scale ``image`` to cover the target (Lanczos) and crop it to exactly the target size.

    ``size``: an int for a square, or ``(width, height)``. ``center_crop``: crop the middle; when False the crop is at
    a random offset drawn from ``rng`` (required then), so the result is deterministic for a given ``rng`` state.
    ``crop``: the geometry already planned (:func:`plan_crop`); then ``rng`` is not drawn from.
    """
    crop = crop or plan_crop(image.size, size, center_crop, rng)
    new_h, new_w = crop.resized
    target_h, target_w = crop.target
    if (new_w, new_h) != image.size:
        image = image.resize((new_w, new_h), Image.Resampling.LANCZOS)
    return image.crop((crop.left, crop.top, crop.left + target_w, crop.top + target_h))


def image_content_hash(path) -> str:
    """SHA-256 hex digest of the file's bytes (a cache key that follows the content, not the name)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
