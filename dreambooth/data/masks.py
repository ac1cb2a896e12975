"""Random inpainting masks for training: rectangles and brush strokes, plus a share of full masks.

A mask is white (255) where the model must paint and black (0) where the image is kept, as in diffusers'
``StableDiffusionInpaintPipeline`` and the WebUI.  Each mask is a pure function of its seed (the loop seeds it from the
run's seed and the sample index), so a resumed run, or several processes, draw exactly the same masks.  The full-mask
share teaches the model plain text-to-image, which is what the WebUI's txt2img asks of an inpainting model (a mask of
ones over a blank image).
"""

from __future__ import annotations

import random
from typing import Any

FULL_MASK_RATIO = 0.25  # the share of full masks the released inpainting models were trained with


def random_mask(width: int, height: int, seed: int, full_mask_ratio: float = FULL_MASK_RATIO) -> Any:
    """A PIL ``L`` image of ``width`` x ``height`` pixels, 255 where to paint; never empty.

    With probability ``full_mask_ratio`` the whole image; else one to three rectangles, or one to four brush strokes
    (polylines of round joints, 1/20 to 1/6 of the short side wide), or both.
    """
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    mask = Image.new("L", (width, height), 0)
    if rng.random() < full_mask_ratio:
        mask.paste(255, (0, 0, width, height))
        return mask
    draw = ImageDraw.Draw(mask)
    kind = rng.choice(("rectangles", "strokes", "both"))
    short = min(width, height)
    if kind in ("rectangles", "both"):
        for _ in range(rng.randint(1, 3)):
            w = rng.randint(max(1, width // 8), max(1, width * 3 // 4))
            h = rng.randint(max(1, height // 8), max(1, height * 3 // 4))
            x, y = rng.randint(0, width - w), rng.randint(0, height - h)
            draw.rectangle((x, y, x + w - 1, y + h - 1), fill=255)
    if kind in ("strokes", "both"):
        for _ in range(rng.randint(1, 4)):
            brush = rng.randint(max(1, short // 20), max(2, short // 6))
            points = [(rng.randrange(width), rng.randrange(height))]
            for _ in range(rng.randint(2, 6)):
                x, y = points[-1]
                step = rng.randint(short // 8, max(short // 8 + 1, short // 2))
                dx, dy = rng.choice((-1, 1)) * rng.randint(0, step), rng.choice((-1, 1)) * rng.randint(0, step)
                points.append((min(width - 1, max(0, x + dx)), min(height - 1, max(0, y + dy))))
            draw.line(points, fill=255, width=brush, joint="curve")
            for x, y in points:  # round brush ends
                draw.ellipse((x - brush // 2, y - brush // 2, x + brush // 2, y + brush // 2), fill=255)
    return mask


def mask_tensor(mask: Any) -> Any:
    """A (1, H, W) float tensor of a mask image: 1 where to paint, 0 where the image is kept."""
    import numpy as np
    import torch

    array = (np.asarray(mask.convert("L"), dtype=np.uint8) >= 128).astype(np.float32)
    return torch.from_numpy(array)[None]
