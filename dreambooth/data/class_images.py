"""Class images for prior preservation: reuse what fits, generate what is missing with the base model.

A generated image carries its prompt in the PNG text chunk ``dreambooth_prompt``.  An image is reused when it has no
such tag (the user's own regularisation images) or when the tag equals the concept's class prompt; images made for
another prompt are left alone and not used (the guide: reuse class images for the same subject, otherwise not).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .images import list_images

PROMPT_TAG = "dreambooth_prompt"


def saved_prompt(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.info.get(PROMPT_TAG)
    except Exception:  # unreadable files are reported by the image check, not here
        return None


def usable_class_images(folder: str | Path, class_prompt: str) -> list[Path]:
    if not folder or not Path(folder).is_dir():
        return []
    return [p for p in list_images(folder) if saved_prompt(p) in (None, class_prompt)]


def generate_class_images(
    components: Any,
    folder: str | Path,
    class_prompt: str,
    negative_prompt: str,
    wanted: int,
    *,
    seed: int,
    steps: int,
    guidance_scale: float,
    resolution: int,
    batch_size: int,
    clip_skip: int = 1,
    should_stop: Callable[[], bool] = lambda: False,
    on_progress: Callable[[int, int], None] = lambda done, total: None,
    shard: tuple[int, int] = (0, 1),
    have: int | None = None,
    device: Any = None,
    autocast_dtype: Any = None,
) -> list[Path]:
    """Make ``wanted`` minus the usable images already in ``folder``; returns the new files.

    ``batch_size`` images are made at a time, under autocast in ``autocast_dtype`` when given (the run's mixed
    precision).  Each image is written (atomically) as soon as its batch is made, so a cancel or a crash keeps every
    finished image and a restart makes only the missing ones, with the seeds the uninterrupted run would have used.

    ``shard``: (rank, processes): with several processes each makes every ``processes``-th batch; they must then
    pass ``have``, the usable images counted by all of them *before* any of them writes (else a fast process's new
    files would shrink a slower one's share).
    """
    from PIL.PngImagePlugin import PngInfo

    from ..models.files import atomic_path
    from ..train.sampling import generate

    folder = Path(folder)
    if have is None:
        have = len(usable_class_images(folder, class_prompt))
    missing = max(0, wanted - have)
    if not missing:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    tag = hashlib.sha256(class_prompt.encode()).hexdigest()[:8]
    existing = {p.name for p in folder.iterdir()}
    written: list[Path] = []
    counter = 0
    rank, world = shard
    suffix = f"-{rank}" if world > 1 else ""  # processes sharing the folder never pick the same name

    def keep(images: list[Any]) -> None:
        nonlocal counter
        for image in images:
            while f"class-{tag}-{counter:05d}{suffix}.png" in existing:
                counter += 1
            name = f"class-{tag}-{counter:05d}{suffix}.png"
            existing.add(name)
            info = PngInfo()
            info.add_text(PROMPT_TAG, class_prompt)
            with atomic_path(folder / name) as temp:
                image.save(temp, format="PNG", pnginfo=info)
            written.append(folder / name)
            on_progress(len(written), missing)

    on_progress(0, missing)
    for batch in range(math.ceil(missing / batch_size)):
        if batch % world != rank:
            continue  # another process makes this batch
        if should_stop():
            break
        count = min(batch_size, missing - batch * batch_size)
        generate(
            components,
            [class_prompt],
            negative_prompt=negative_prompt,
            steps=steps,
            guidance_scale=guidance_scale,
            seed=seed + have + batch * batch_size,  # the same images whatever the number of processes
            images_per_prompt=count,
            resolution=resolution,
            clip_skip=clip_skip,
            batch_size=batch_size,
            device=device,
            autocast_dtype=autocast_dtype,
            on_batch=keep,
        )
    return written
