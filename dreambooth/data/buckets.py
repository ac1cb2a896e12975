"""Aspect-ratio buckets: training sizes of about the same area but different shapes, and which image goes where.

The guide's list for a 512 px model runs from 256x1024 to 1024x256 in 64-px steps with an area of at most 512x512:
for each width ``w`` from the smallest side up, the tallest height in 64-px steps that keeps ``w x h`` within the area.
Each image goes to the bucket whose aspect ratio is closest to its own (compared in log space, so 2:1 and 1:2 are
equally far from square), then it is scaled to cover the bucket and cropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

STEP = 64
EXIF_ORIENTATION = 274


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def aspect(self) -> float:
        return self.width / self.height

    def __str__(self) -> str:
        return f"{self.width}x{self.height}"


def generate_buckets(
    resolution: int, min_side: int | None = None, max_side: int | None = None, step: int = STEP
) -> list[Bucket]:
    """Buckets of area at most ``resolution``², sides from ``min_side`` (default resolution/2) to ``max_side``
    (default resolution*2) in ``step``-px steps, both orientations, square included; sorted by aspect ratio."""
    min_side = min_side or max(step, resolution // 2 // step * step)
    max_side = max_side or resolution * 2
    if min_side % step or max_side % step or resolution % 8:
        raise ValueError(f"bucket sides must be multiples of {step} (got {min_side}, {max_side})")
    if min_side > max_side:
        raise ValueError(f"the smallest bucket side {min_side} is above the largest {max_side}")
    area = resolution * resolution
    found = set()
    for width in range(min_side, max_side + 1, step):
        height = min(max_side, area // width // step * step)
        if height < min_side:
            continue
        found.add(Bucket(width, height))
        found.add(Bucket(height, width))
    side = resolution // step * step
    if side >= min_side:
        found.add(Bucket(side, side))
    return sorted(found, key=lambda b: (b.aspect, b.width))


def parse_buckets(text: str) -> list[Bucket]:
    """``"512x512, 576x448 448x576"`` -> buckets; every side must be a positive multiple of 8."""
    buckets = []
    for item in text.replace(",", " ").split():
        try:
            width, height = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise ValueError(f"'{item}' is not a bucket: write WIDTHxHEIGHT, e.g. 576x448") from None
        if width <= 0 or height <= 0 or width % 8 or height % 8:
            raise ValueError(f"bucket {item}: both sides must be positive multiples of 8")
        buckets.append(Bucket(width, height))
    if not buckets:
        raise ValueError("the bucket list is empty")
    return sorted(set(buckets), key=lambda b: (b.aspect, b.width))


def closest_bucket(width: int, height: int, buckets: list[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (ties: the larger area, then the first)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size {width}x{height} is not positive")
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b.aspect) - target), -b.width * b.height))


def resolve_buckets(settings: Any) -> list[Bucket]:
    """The buckets of a run: the custom list when given, else generated from the resolution and the sides."""
    if settings.aspect_buckets.strip():
        return parse_buckets(settings.aspect_buckets)
    return generate_buckets(settings.resolution, settings.bucket_min_side, settings.bucket_max_side)


def oriented_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as the image is shown (EXIF rotation applied), read from the header only."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
        try:
            orientation = image.getexif().get(EXIF_ORIENTATION, 1)
        except Exception:  # a broken EXIF block: the stored orientation, as load_image does
            orientation = 1
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def assign_buckets(paths: list[Path], buckets: list[Bucket]) -> dict[Path, Bucket]:
    return {path: closest_bucket(*oriented_size(path), buckets) for path in paths}


def bucket_report(assignment: dict[Path, Bucket]) -> dict[str, Any]:
    """JSON-ready: every image's bucket and the count per bucket (what ``debug_arb`` saves)."""
    counts: dict[str, int] = {}
    for bucket in assignment.values():
        counts[str(bucket)] = counts.get(str(bucket), 0) + 1
    return {
        "counts": dict(sorted(counts.items(), key=lambda item: -item[1])),
        "images": {str(path): str(bucket) for path, bucket in sorted(assignment.items())},
    }
