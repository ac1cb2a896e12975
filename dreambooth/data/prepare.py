"""``python -m dreambooth prepare``: turn a folder of odd photos into training images of one exact size.

Every image under SRC (recursively, as :func:`~.images.list_images` finds them) is opened with
:func:`~.images.load_image` (EXIF rotation applied, transparency composited on a background colour, CMYK and 16-bit
converted), scaled to cover the target with Lanczos and cropped, then written under DST at the same relative path with
the output format's suffix. SRC is only read, never written.

* Target: ``size`` x ``size``, or with ``bucket=True`` the aspect bucket of ``generate_buckets(size)`` closest to the
  image's aspect ratio (the training's own bucket list for that resolution).
* Crop: ``center``; ``entropy``, the window with the most edge energy (see :func:`entropy_offset`); ``focal``, the
  window centred on a point given per image (see :func:`load_focal_points`), clamped inside the image.
* Images smaller than the target are **written, upscaled**, and reported as ``upscaled from WxH`` (what users of
  BIRME expect); a byte-identical copy of an earlier image is skipped and reported with the file it duplicates; a file
  that cannot be read is reported with the reason; a second source that would be written under the same output name
  (``a.jpg`` and ``a.png``) is skipped and reported as a name clash, nothing is overwritten.
* A caption ``IMAGE.txt`` beside an image is copied, bytes unchanged, beside its output; a loss mask
  ``IMAGE.mask.png`` (data/loss_masks.py) is cropped and scaled with its image, to the output's ``STEM.mask.png``.
* Every file is written atomically (temporary file, then rename).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageColor

from ..errors import DreamBoothError
from ..models.files import atomic_path
from .buckets import closest_bucket, generate_buckets
from .images import ImageError, image_content_hash, list_images, load_image
from .loss_masks import check_mask, mask_file

CROPS = ("center", "entropy", "focal")
FORMATS = {"png": (".png", "PNG"), "jpg": (".jpg", "JPEG"), "webp": (".webp", "WEBP")}
QUALITY = 95  # JPEG and WebP quality
MIN_SIZE, MAX_SIZE = 8, 4096
ENTROPY_CANDIDATES = 16  # crop positions tried along the long axis by the entropy crop

ProgressCallback = Callable[[int, int, Path], None]


@dataclass(frozen=True)
class PreparedImage:
    """One written image.

    ``source``: the file in SRC; ``output``: the file written in DST; ``original_size``: the source's (width, height)
    after EXIF rotation; ``size``: the output's (width, height); ``crop_box``: the window of the source that became the
    output, ``(left, top, right, bottom)`` in source pixels (fractional); ``upscaled``: the window was smaller than the
    output, so the image was enlarged; ``caption``: the caption file copied beside the output, if any; ``mask``: the
    loss mask written beside the output (the source's mask with the same window and scale), if any.
    """

    source: Path
    output: Path
    original_size: tuple[int, int]
    size: tuple[int, int]
    crop_box: tuple[float, float, float, float]
    upscaled: bool = False
    caption: Path | None = None
    mask: Path | None = None


@dataclass(frozen=True)
class Problem:
    """A source file that was skipped or treated specially: ``reason`` is a plain sentence; ``other`` is the earlier
    file a duplicate or a name clash refers to."""

    path: Path
    reason: str
    other: Path | None = None


@dataclass
class PrepareReport:
    """What :func:`prepare_folder` did.

    ``source``, ``destination``, ``size``, ``crop``, ``bucket``, ``image_format``: the call's folders and options.
    ``written``: every image written (upscaled ones included); ``unreadable``: files that could not be read, with the
    reason (not written); ``duplicates``: byte copies of an earlier image (not written); ``name_clashes``: sources whose
    output name was already taken by an earlier source (not written); ``focal_fallbacks``: images cropped at the centre
    because the focal file has no point for them (written); ``unused_focal_points``: keys of the focal file that match
    no image in SRC.
    """

    source: Path
    destination: Path
    size: int
    crop: str
    bucket: bool
    image_format: str
    written: list[PreparedImage] = field(default_factory=list)
    unreadable: list[Problem] = field(default_factory=list)
    duplicates: list[Problem] = field(default_factory=list)
    name_clashes: list[Problem] = field(default_factory=list)
    focal_fallbacks: list[Problem] = field(default_factory=list)
    unused_focal_points: list[str] = field(default_factory=list)

    @property
    def upscaled(self) -> list[PreparedImage]:
        """The written images that were enlarged because they are smaller than their target."""
        return [image for image in self.written if image.upscaled]

    @property
    def captions(self) -> list[Path]:
        """The caption files written in DST."""
        return [image.caption for image in self.written if image.caption is not None]

    def _relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.source).as_posix()
        except ValueError:
            return str(path)

    def problems(self) -> list[str]:
        """One line ``"RELATIVE/PATH: reason"`` per problem, in the order of the source files."""
        items = [
            *(
                Problem(image.source, _upscaled_reason(image.original_size, image.size, self.bucket))
                for image in self.upscaled
            ),
            *self.unreadable,
            *self.duplicates,
            *self.name_clashes,
            *self.focal_fallbacks,
        ]
        items.sort(key=lambda problem: str(problem.path))
        lines = [f"{self._relative(problem.path)}: {problem.reason}" for problem in items]
        lines.extend(
            f"{key} (focal file): matches no image in {self.source}; its focal point was not used"
            for key in self.unused_focal_points
        )
        return lines

    def summary(self) -> str:
        """A few lines for a person: what was written where, then every problem with its reason."""
        target = f"{self.size} px aspect buckets" if self.bucket else f"{self.size}x{self.size}"
        captions = len(self.captions)
        head = (
            f"{self.source} -> {self.destination}: {len(self.written)} image(s) written "
            f"({target}, {self.crop} crop, {self.image_format})"
        )
        if captions:
            head += f", {captions} caption(s) copied"
        masks = sum(image.mask is not None for image in self.written)
        if masks:
            head += f", {masks} mask(s) cropped with their image"
        problems = self.problems()
        if not problems:
            return head
        return "\n".join([head, f"{len(problems)} problem(s):", *(f"  {line}" for line in problems)])


def _upscaled_reason(original: tuple[int, int], size: tuple[int, int], bucket: bool) -> str:
    target = f"its {size[0]}x{size[1]} bucket" if bucket else f"{size[0]}x{size[1]}"
    return f"upscaled from {original[0]}x{original[1]} (smaller than {target}, may look soft); written"


# --- options -----------------------------------------------------------------------------------------------------

_RGB_TRIPLE = re.compile(r"^\s*(\d{1,3})\s*,\s*(\d{1,3})\s*,\s*(\d{1,3})\s*$")


def parse_colour(text: str) -> tuple[int, int, int]:
    """``"#ffffff"``, ``"#fff"``, ``"255,255,255"`` or a CSS colour name (``"white"``) -> ``(r, g, b)``.

    Raises :class:`DreamBoothError` for anything else, or for a colour with an alpha component (the background of a
    transparent image must be opaque).
    """
    match = _RGB_TRIPLE.match(text)
    if match:
        values = tuple(int(value) for value in match.groups())
        if all(0 <= value <= 255 for value in values):
            return values  # type: ignore[return-value]
    else:
        try:
            values = ImageColor.getrgb(text.strip())
        except ValueError:
            values = ()
        if len(values) == 3:
            return values  # type: ignore[return-value]
    raise DreamBoothError(
        f"background colour '{text}': not an opaque RGB colour; write it as #RRGGBB (e.g. #ffffff) or R,G,B with "
        "values 0-255 (e.g. 255,255,255)."
    )


def _focal_key(key: str) -> str:
    key = key.replace("\\", "/")
    while key.startswith("./"):
        key = key[2:]
    return key


def _check_point(value, where: str) -> tuple[float, float]:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not all(0.0 <= float(v) <= 1.0 for v in value)
    ):
        raise DreamBoothError(
            f"{where}: focal point {value!r} is not [x, y] with both between 0 and 1 (fractions of the image's width "
            "and height, from the top-left corner); fix that entry."
        )
    return float(value[0]), float(value[1])


def load_focal_points(path) -> dict[str, tuple[float, float]]:
    """Read a focal-point file: a JSON object ``{"relative/path.jpg": [x, y], ...}``.

    Keys are image paths relative to SRC (``/`` or ``\\`` separators); ``x`` and ``y`` are fractions in ``[0, 1]`` of
    the upright (EXIF-corrected) image's width and height, from its top-left corner. Raises :class:`DreamBoothError`
    naming the file for an unreadable file, invalid JSON or a malformed entry.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DreamBoothError(f"{path}: cannot read the focal-point file ({exc}); check the path.") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DreamBoothError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); write an object like "
            '{"photo.jpg": [0.5, 0.3]}.'
        ) from exc
    if not isinstance(data, dict):
        raise DreamBoothError(
            f'{path}: the focal-point file must hold a JSON object like {{"photo.jpg": [0.5, 0.3]}}, '
            f"not a {type(data).__name__}."
        )
    return {_focal_key(key): _check_point(value, f"{path}: '{key}'") for key, value in data.items()}


def _check_folders(src: Path, dst: Path, overwrite: bool) -> None:
    if not src.is_dir():
        reason = "is a file, not a folder" if src.exists() else "does not exist"
        raise DreamBoothError(f"{src}: the source folder {reason}; give the folder that holds your images.")
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_dst == real_src or real_src in real_dst.parents:
        raise DreamBoothError(
            f"{dst}: the destination is inside the source folder {src}; the prepared images would be mixed with the "
            "originals. Choose a destination outside the source folder."
        )
    if real_dst in real_src.parents:
        raise DreamBoothError(
            f"{dst}: the destination contains the source folder {src}; choose a destination that does not."
        )
    if dst.exists():
        if not dst.is_dir():
            raise DreamBoothError(f"{dst}: the destination is a file, not a folder; choose a folder name.")
        if not overwrite and any(dst.iterdir()):
            raise DreamBoothError(
                f"{dst}: the destination folder is not empty; choose a new or empty folder, or pass --overwrite "
                "(overwrite=True) to replace files of the same names."
            )


# --- geometry ----------------------------------------------------------------------------------------------------


def _window(width: int, height: int, target: tuple[int, int]) -> tuple[float, float]:
    """(width, height) in source pixels of the largest window with the target's aspect ratio inside the image."""
    target_w, target_h = target
    if width * target_h > height * target_w:  # the image is wider than the target: crop the sides
        return height * target_w / target_h, float(height)
    return float(width), width * target_h / target_w


def _edge_energy(image: Image.Image, scale: float) -> np.ndarray:
    """Sobel gradient magnitude of a grayscale copy of ``image`` scaled by ``scale`` (2-D float array)."""
    width, height = image.size
    small = (max(1, round(width * scale)), max(1, round(height * scale)))
    copy = image.resize(small, Image.Resampling.BOX) if small != image.size else image
    gray = np.asarray(copy.convert("L"), dtype=np.float32)
    magnitude = np.zeros_like(gray)
    if gray.shape[0] >= 3 and gray.shape[1] >= 3:
        right = gray[:-2, 2:] + 2 * gray[1:-1, 2:] + gray[2:, 2:]
        left = gray[:-2, :-2] + 2 * gray[1:-1, :-2] + gray[2:, :-2]
        bottom = gray[2:, :-2] + 2 * gray[2:, 1:-1] + gray[2:, 2:]
        top = gray[:-2, :-2] + 2 * gray[:-2, 1:-1] + gray[:-2, 2:]
        magnitude[1:-1, 1:-1] = np.hypot(right - left, bottom - top)
    return magnitude


def entropy_offset(image: Image.Image, target: tuple[int, int], candidates: int = ENTROPY_CANDIDATES) -> float:
    """Offset (source pixels, along the axis that gets cropped) of the most "interesting" crop window.

    ``image``: the upright RGB image; ``target``: the output (width, height); ``candidates``: how many evenly spaced
    window positions are compared, from one end of the long axis to the other.

    Interest is *edge energy*: the sum, over the window, of the Sobel gradient magnitude of a grayscale copy of the
    image at half the output's scale (never above the original's), so detail too fine to survive the resize does not
    count. Texture, outlines and faces score high; flat sky, walls and studio backdrops score zero. The centred window
    is always a candidate, and ties (a flat image) go to the window nearest the centre.
    """
    width, height = image.size
    window_w, window_h = _window(width, height, target)
    horizontal = width - window_w >= height - window_h
    slack = (width - window_w) if horizontal else (height - window_h)
    if slack < 1:
        return slack / 2
    scale = min(1.0, 0.5 * target[0] / window_w)
    energy = _edge_energy(image, scale)
    profile = energy.sum(axis=0 if horizontal else 1, dtype=np.float64)
    cumulative = np.concatenate([[0.0], np.cumsum(profile)])
    positions = np.arange(len(cumulative), dtype=np.float64)
    length = window_w if horizontal else window_h
    # the work copy's pixels per source pixel along this axis (rounding makes it differ slightly from ``scale``)
    axis_scale = (len(profile)) / (width if horizontal else height)
    best, best_key = slack / 2, None
    offsets = [slack / 2, *np.linspace(0.0, slack, max(2, min(candidates, int(slack) + 1)))]  # the centre first
    for offset in offsets:
        start, end = offset * axis_scale, (offset + length) * axis_scale
        score = float(np.interp(end, positions, cumulative) - np.interp(start, positions, cumulative))
        key = (score, -abs(offset - slack / 2))
        if best_key is None or key > best_key:
            best, best_key = float(offset), key
    return best


def crop_box(
    image: Image.Image,
    target: tuple[int, int],
    crop: str = "center",
    focal_point: tuple[float, float] | None = None,
) -> tuple[float, float, float, float]:
    """The window ``(left, top, right, bottom)`` of ``image`` (source pixels) that is scaled to ``target``.

    ``target``: output (width, height); ``crop``: ``"center"``, ``"entropy"`` or ``"focal"``; ``focal_point``: for
    ``"focal"``, ``(x, y)`` fractions of the image's width and height: the window is centred on it, then moved the
    least needed to stay inside the image (``None`` falls back to the centre).
    """
    width, height = image.size
    window_w, window_h = _window(width, height, target)
    slack_x, slack_y = width - window_w, height - window_h
    left, top = slack_x / 2, slack_y / 2
    if crop == "entropy":
        offset = entropy_offset(image, target)
        if slack_x >= slack_y:
            left = offset
        else:
            top = offset
    elif crop == "focal" and focal_point is not None:
        left = min(max(focal_point[0] * width - window_w / 2, 0.0), slack_x)
        top = min(max(focal_point[1] * height - window_h / 2, 0.0), slack_y)
    return left, top, left + window_w, top + window_h


# --- writing -----------------------------------------------------------------------------------------------------


def _save(image: Image.Image, output: Path, image_format: str) -> None:
    pil_format = FORMATS[image_format][1]
    icc = image.info.get("icc_profile")
    image.info = {}  # no stale EXIF orientation, transparency or a CMYK/gray colour profile from the source
    options: dict = {}
    if isinstance(icc, bytes) and icc[16:20] == b"RGB ":  # keep an RGB profile (Display P3, Adobe RGB, ...)
        options["icc_profile"] = icc
    if pil_format in ("JPEG", "WEBP"):
        options["quality"] = QUALITY
    try:
        with atomic_path(output) as temp:
            image.save(temp, format=pil_format, **options)
    except OSError as exc:
        raise DreamBoothError(
            f"{output}: cannot be written ({exc.strerror or exc}); check the free space and permissions of the "
            "destination folder."
        ) from exc


def _copy_caption(caption: Path, output: Path) -> None:
    try:
        data = caption.read_bytes()
        with atomic_path(output) as temp:
            temp.write_bytes(data)
    except OSError as exc:
        raise DreamBoothError(
            f"{caption}: the caption could not be copied to {output} ({exc.strerror or exc}); check the permissions "
            "and free space."
        ) from exc


def prepare_folder(
    src,
    dst,
    size: int = 512,
    crop: str = "center",
    bucket: bool = False,
    image_format: str = "png",
    background: tuple[int, int, int] = (255, 255, 255),
    focal_points: Mapping[str, tuple[float, float]] | None = None,
    progress: ProgressCallback | None = None,
    overwrite: bool = False,
) -> PrepareReport:
    """Prepare every image under ``src`` into ``dst``; returns a :class:`PrepareReport`.

    ``src``: folder of images (read recursively, never modified). ``dst``: output folder, outside ``src``; it must not
    exist or be empty unless ``overwrite`` (then files of the same names are replaced, others are left alone).
    ``size``: side of the square output, or the resolution whose aspect buckets are used when ``bucket`` is true
    (then a multiple of 32). ``crop``: ``"center"``, ``"entropy"`` (most edge energy, see :func:`entropy_offset`) or
    ``"focal"`` (centred on ``focal_points[relative path]``; images without a point are cropped at the centre and
    reported). ``image_format``: ``"png"``, ``"jpg"`` (quality 95) or ``"webp"`` (quality 95). ``background``: RGB
    colour transparent areas are composited on. ``focal_points``: ``{"sub/photo.jpg": (x, y)}`` fractions of the
    upright image, as :func:`load_focal_points` returns. ``progress``: called as ``progress(done, total, source)``
    after each file.

    Images smaller than their target (square: the shorter side below ``size``; buckets: smaller than the bucket on
    either side once its aspect ratio is matched) are written upscaled and listed in ``report.upscaled``. Raises
    :class:`DreamBoothError` for bad folders or options, or when a file cannot be written; a bad *source* file never
    stops the run.
    """
    src, dst = Path(src), Path(dst)
    image_format = image_format.lower().lstrip(".")
    image_format = {"jpeg": "jpg"}.get(image_format, image_format)
    if image_format not in FORMATS:
        raise DreamBoothError(f"output format '{image_format}': unknown; use one of {', '.join(FORMATS)}.")
    if crop not in CROPS:
        raise DreamBoothError(f"crop '{crop}': unknown; use one of {', '.join(CROPS)}.")
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise DreamBoothError(f"size {size!r}: must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}.")
    if crop == "focal" and focal_points is None:
        raise DreamBoothError("crop 'focal' needs focal points: give a JSON file of them with --focal-file.")
    if crop != "focal" and focal_points:
        raise DreamBoothError(f"focal points are only used with crop 'focal' (the crop is '{crop}'); use --crop focal.")
    points = {_focal_key(k): _check_point(value, f"focal point '{k}'") for k, value in (focal_points or {}).items()}
    background = tuple(int(v) for v in background)  # type: ignore[assignment]
    if len(background) != 3 or not all(0 <= v <= 255 for v in background):
        raise DreamBoothError(f"background {background!r}: must be three values 0-255 (R, G, B).")
    buckets = None
    if bucket:
        try:
            buckets = generate_buckets(size)
        except ValueError as exc:
            raise DreamBoothError(
                f"size {size}: aspect buckets need a size that is a multiple of 32, e.g. 512 or 768 ({exc})."
            ) from exc
    _check_folders(src, dst, overwrite)

    report = PrepareReport(src, dst, size, crop, bucket, image_format)
    suffix = FORMATS[image_format][0]
    sources = list_images(src)
    dst.mkdir(parents=True, exist_ok=True)
    seen_hashes: dict[str, Path] = {}  # content hash -> the first source written with it
    taken_names: dict[str, Path] = {}  # case-folded output path -> the source written there
    for done, source in enumerate(sources, start=1):
        relative = source.relative_to(src)
        key = relative.as_posix()
        output = dst / relative.with_suffix(suffix)
        output_name = output.relative_to(dst).as_posix()
        caption = source.with_suffix(".txt")
        has_caption = caption.is_file()
        not_copied = f" (its caption {caption.name} was not copied)" if has_caption else ""
        try:
            digest = image_content_hash(source)
        except OSError as exc:
            report.unreadable.append(Problem(source, f"cannot be read ({exc.strerror or exc})"))
        else:
            if digest in seen_hashes:
                first = seen_hashes[digest]
                reason = f"same content as {first.relative_to(src).as_posix()}; skipped{not_copied}"
                report.duplicates.append(Problem(source, reason, first))
            elif output_name.casefold() in taken_names:
                first = taken_names[output_name.casefold()]
                reason = (
                    f"would be written as {output_name}, already written from {first.relative_to(src).as_posix()}; "
                    f"skipped, nothing was overwritten (rename one of them){not_copied}"
                )
                report.name_clashes.append(Problem(source, reason, first))
            else:
                try:
                    image = load_image(source, background=background)
                except ImageError as exc:
                    report.unreadable.append(Problem(source, exc.reason))
                else:
                    with image:
                        point = points.get(key)
                        prepared = _prepare_one(image, source, output, buckets, size, crop, point, image_format)
                    if crop == "focal" and key not in points:
                        reason = "has no focal point in the focal file; cropped at the centre"
                        report.focal_fallbacks.append(Problem(source, reason))
                    if has_caption:
                        caption_output = output.with_suffix(".txt")
                        _copy_caption(caption, caption_output)
                        prepared = replace(prepared, caption=caption_output)
                    if mask_file(source).is_file():
                        problem = check_mask(source, 1.0)
                        if problem:
                            report.unreadable.append(Problem(mask_file(source), f"{problem}; not copied"))
                        else:
                            prepared = replace(prepared, mask=_prepare_mask(mask_file(source), prepared))
                    report.written.append(prepared)
                    seen_hashes[digest] = source
                    taken_names[output_name.casefold()] = source
        if progress is not None:
            progress(done, len(sources), source)
    report.unused_focal_points = sorted(set(points) - {source.relative_to(src).as_posix() for source in sources})
    return report


def _prepare_mask(mask: Path, prepared: PreparedImage) -> Path:
    """The loss mask of a prepared image: the same window of it, scaled the same way; written as a PNG."""
    output = mask_file(prepared.output)
    with load_image(mask) as grey:
        result = grey.convert("L").resize(prepared.size, Image.Resampling.LANCZOS, box=prepared.crop_box)
    _save(result, output, "png")
    return output


def _prepare_one(
    image: Image.Image,
    source: Path,
    output: Path,
    buckets,
    size: int,
    crop: str,
    focal_point: tuple[float, float] | None,
    image_format: str,
) -> PreparedImage:
    """Crop, scale and write one loaded image; returns its :class:`PreparedImage` (without caption)."""
    width, height = image.size
    if buckets is not None:
        chosen = closest_bucket(width, height, buckets)
        target = (chosen.width, chosen.height)
    else:
        target = (size, size)
    box = crop_box(image, target, crop, focal_point)
    upscaled = box[2] - box[0] < target[0] - 1e-6
    result = image.resize(target, Image.Resampling.LANCZOS, box=box)
    try:
        _save(result, output, image_format)
    finally:
        result.close()
    return PreparedImage(source, output, (width, height), target, box, upscaled)
