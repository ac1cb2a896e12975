"""Pixels and latents of training images, computed once.

A latent is cached as the VAE's distribution (mean and standard deviation), and each step draws
``mean + std * noise`` with the step's own generator: the same as encoding every step, without the VAE.  Entries are
keyed by the image's content, the transform (resolution, crop box, flip) and the VAE, in memory and optionally on disk
(``cache_dir``), so a second run with the same data skips the VAE entirely.

Augmentation and caching: a horizontal flip is not exact in latent space (the VAE is not flip-equivariant), so each
flip variant is encoded and cached separately.  With ``cache_latents`` on, a random crop is drawn once per image
(from the seed) so that its latent can be reused; with caching off it is drawn anew each epoch.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path
from typing import Any

from .augment import Augmentation
from .dataset import mix_seed
from .images import Crop, image_content_hash, load_image, plan_crop, resize_and_crop


def pixels(
    path: Path,
    size: int | tuple[int, int],
    center_crop: bool,
    flip: bool,
    crop_seed: int,
    augmentation: Augmentation | None = None,
    augment_seed: int = 0,
) -> Any:
    """A (3, H, W) float tensor in [-1, 1]; ``size`` is a square side or a (width, height) bucket."""
    return pixels_and_crop(path, size, center_crop, flip, crop_seed, augmentation, augment_seed)[0]


def pixels_and_crop(
    path: Path,
    size: int | tuple[int, int],
    center_crop: bool,
    flip: bool,
    crop_seed: int,
    augmentation: Augmentation | None = None,
    augment_seed: int = 0,
) -> tuple[Any, Crop]:
    """:func:`pixels` and the :class:`~dreambooth.data.images.Crop` they were cut with (flipped with them)."""
    import numpy as np
    import torch
    from PIL import Image

    image = _source_image(path, augmentation, augment_seed)
    crop = plan_crop(image.size, size, center_crop, random.Random(crop_seed))
    image = resize_and_crop(image, size, crop=crop)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
        crop = crop.flipped()
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1), crop


def crop_of(
    path: Path,
    size: int | tuple[int, int],
    center_crop: bool,
    flip: bool,
    crop_seed: int,
    augmentation: Augmentation | None = None,
    augment_seed: int = 0,
) -> Crop:
    """The crop :func:`pixels` takes with these arguments, without resizing (the image is still decoded: its size
    after augmentation decides the crop)."""
    image = _source_image(path, augmentation, augment_seed)
    crop = plan_crop(image.size, size, center_crop, random.Random(crop_seed))
    return crop.flipped() if flip else crop


def _source_image(path: Path, augmentation: Augmentation | None, augment_seed: int) -> Any:
    image = load_image(path)
    if augmentation is not None:
        image = augmentation.apply(image, augment_seed)
    return image


def module_fingerprint(module: Any) -> str:
    """A short identity of a module's weights (a few tensors' bytes and every shape)."""
    digest = hashlib.sha256()
    state = module.state_dict()
    for key in sorted(state):
        digest.update(f"{key}{tuple(state[key].shape)}".encode())
    keys = sorted(state)
    for key in keys[:2] + keys[-2:]:
        digest.update(state[key].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def latent_distribution(vae: Any, image: Any) -> tuple[Any, Any]:
    """(mean, std) of the VAE's latent distribution for one (3, H, W) image, on the CPU in fp32."""
    import torch

    parameter = next(vae.parameters())
    with torch.no_grad():
        dist = vae.encode(image.unsqueeze(0).to(parameter.device, parameter.dtype)).latent_dist
    return dist.mean[0].float().cpu(), dist.std[0].float().cpu()


class ContentHashes:
    """Each file's content hash, read once per run (crop seeds and cache keys depend on content, not path)."""

    def __init__(self) -> None:
        self._hashes: dict[Path, str] = {}

    def get(self, path: Path) -> str:
        if path not in self._hashes:
            self._hashes[path] = image_content_hash(path)
        return self._hashes[path]


class LatentCache:
    """VAE latent distributions of (image, transform) pairs, in memory and optionally on disk."""

    def __init__(
        self,
        contents: ContentHashes,
        vae: Any,
        resolution: int,
        center_crop: bool,
        seed: int,
        cache_dir: Path | None,
        augmentation: Augmentation | None = None,
    ):
        self.augmentation = augmentation
        self.contents = contents
        self.vae = vae
        self.resolution = resolution
        self.center_crop = center_crop
        self.seed = seed
        self.cache_dir = cache_dir
        self.memory: dict[str, tuple[Any, Any]] = {}
        self.crops: dict[str, Crop] = {}  # the crop each entry was encoded from (SDXL's time ids need it)
        self.vae_id = module_fingerprint(vae)

    def crop_seed(self, path: Path) -> int:
        """Keyed by the image's content, so moving or renaming the dataset keeps the crops."""
        return mix_seed(self.seed, "crop", self.contents.get(path))

    def augment_seed(self, path: Path, variant: int) -> int:
        return mix_seed(self.seed, "augment", self.contents.get(path), variant)

    def key(self, path: Path, flip: bool, size: tuple[int, int] | None = None, variant: int = 0) -> str:
        crop = "center" if self.center_crop else f"random{self.crop_seed(path)}"
        shape = f"{size[0]}x{size[1]}" if size else str(self.resolution)
        text = f"{self.contents.get(path)}|{shape}|{crop}|{int(flip)}|{self.vae_id}"
        if self.augmentation is not None:
            text += f"|{self.augmentation.key()}|{variant}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, path: Path, flip: bool, size: tuple[int, int] | None = None, variant: int = 0) -> tuple[Any, Any]:
        """(mean, std) of the latent distribution, on the CPU; ``size`` a bucket (else the square resolution)."""
        key = self.key(path, flip, size, variant)
        if key in self.memory:
            return self.memory[key]
        entry = self._read_disk(key)
        if entry is None:
            image, self.crops[key] = self._pixels_and_crop(path, flip, size, variant)
            entry = latent_distribution(self.vae, image)
            self._write_disk(key, entry, self.crops[key])
        self.memory[key] = entry
        return entry

    def crop(self, path: Path, flip: bool, size: tuple[int, int] | None = None, variant: int = 0) -> Crop:
        """The crop the entry of these arguments was encoded from (remembered with the entry, on disk too)."""
        key = self.key(path, flip, size, variant)
        if key not in self.crops:
            self._read_disk(key)
        if key not in self.crops:  # an entry written before crops were kept: the same seeds give the same crop
            self.crops[key] = crop_of(*self._arguments(path, flip, size, variant))
        return self.crops[key]

    def pixels(self, path: Path, flip: bool, size: tuple[int, int] | None = None, variant: int = 0) -> Any:
        """The (3, H, W) pixels in [-1, 1] that the entry of these arguments is (or would be) encoded from."""
        return self._pixels_and_crop(path, flip, size, variant)[0]

    def _pixels_and_crop(self, path: Path, flip: bool, size: tuple[int, int] | None, variant: int) -> Any:
        return pixels_and_crop(*self._arguments(path, flip, size, variant))

    def _arguments(self, path: Path, flip: bool, size: tuple[int, int] | None, variant: int) -> tuple:
        size_or_side = size or self.resolution
        seeds = (self.crop_seed(path), self.augmentation, self.augment_seed(path, variant))
        return (path, size_or_side, self.center_crop, flip, *seeds)

    def _read_disk(self, key: str) -> tuple[Any, Any] | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            entry = tensors["mean"], tensors["std"]
        except Exception:  # a damaged cache entry is recomputed, never trusted
            return None
        if "crop" in tensors:
            self.crops[key] = Crop.from_list(tensors["crop"].tolist())
        return entry

    def _write_disk(self, key: str, entry: tuple[Any, Any], crop: Crop | None = None) -> None:
        if self.cache_dir is None:
            return
        from safetensors.torch import save_file

        from ..models.files import atomic_path

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.cache_dir / f"{key}.safetensors") as temp:
            tensors = {"mean": entry[0].contiguous(), "std": entry[1].contiguous()}
            if crop is not None:
                import torch

                tensors["crop"] = torch.tensor(crop.as_list(), dtype=torch.int64)
            save_file(tensors, str(temp))
