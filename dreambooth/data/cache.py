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

from .dataset import mix_seed
from .images import image_content_hash, load_image, resize_and_crop


def pixels(path: Path, resolution: int, center_crop: bool, flip: bool, crop_seed: int) -> Any:
    """A (3, H, W) float tensor in [-1, 1]."""
    import numpy as np
    import torch
    from PIL import Image

    image = resize_and_crop(load_image(path), resolution, center_crop=center_crop, rng=random.Random(crop_seed))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


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


class LatentCache:
    """VAE latent distributions of (image, transform) pairs, in memory and optionally on disk."""

    def __init__(self, vae: Any, device: Any, resolution: int, center_crop: bool, seed: int, cache_dir: Path | None):
        self.vae = vae
        self.device = device
        self.resolution = resolution
        self.center_crop = center_crop
        self.seed = seed
        self.cache_dir = cache_dir
        self.memory: dict[str, tuple[Any, Any]] = {}
        self.vae_id = module_fingerprint(vae)
        self._content: dict[Path, str] = {}
        self.encoded = 0  # how many images went through the VAE (tests and the benchmark read it)

    def content(self, path: Path) -> str:
        if path not in self._content:
            self._content[path] = image_content_hash(path)
        return self._content[path]

    def crop_seed(self, path: Path) -> int:
        """Keyed by the image's content, so moving or renaming the dataset keeps the crops."""
        return mix_seed(self.seed, "crop", self.content(path))

    def key(self, path: Path, flip: bool) -> str:
        self.content(path)
        crop = "center" if self.center_crop else f"random{self.crop_seed(path)}"
        text = f"{self._content[path]}|{self.resolution}|{crop}|{int(flip)}|{self.vae_id}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def get(self, path: Path, flip: bool) -> tuple[Any, Any]:
        """(mean, std) of the latent distribution, on the CPU."""
        key = self.key(path, flip)
        if key in self.memory:
            return self.memory[key]
        entry = self._read_disk(key)
        if entry is None:
            entry = self._encode(path, flip)
            self._write_disk(key, entry)
        self.memory[key] = entry
        return entry

    def _encode(self, path: Path, flip: bool) -> tuple[Any, Any]:
        import torch

        image = pixels(path, self.resolution, self.center_crop, flip, self.crop_seed(path))
        parameter = next(self.vae.parameters())
        with torch.no_grad():
            dist = self.vae.encode(image.unsqueeze(0).to(parameter.device, parameter.dtype)).latent_dist
        self.encoded += 1
        return dist.mean[0].float().cpu(), dist.std[0].float().cpu()

    def _read_disk(self, key: str) -> tuple[Any, Any] | None:
        if self.cache_dir is None:
            return None
        path = self.cache_dir / f"{key}.safetensors"
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(path))
            return tensors["mean"], tensors["std"]
        except Exception:  # a damaged cache entry is recomputed, never trusted
            return None

    def _write_disk(self, key: str, entry: tuple[Any, Any]) -> None:
        if self.cache_dir is None:
            return
        from safetensors.torch import save_file

        from ..models.files import atomic_path

        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.cache_dir / f"{key}.safetensors") as temp:
            save_file({"mean": entry[0].contiguous(), "std": entry[1].contiguous()}, str(temp))
