"""Per-image captions and the prompt each image trains with.

A caption comes from one of :data:`CAPTION_SOURCES`: the shared instance prompt alone (``"prompt"``), an ``IMAGE.txt``
file beside ``IMAGE.png`` (``"txt"``, the guide's ``use_txt_as_label``), or the image's file name (``"filename"``,
``use_filename_as_label``). :func:`render_prompt` combines it with the instance or class prompt.
"""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import DreamBoothError

CAPTION_SOURCES = ("prompt", "txt", "filename")

_BOMS = (
    (b"\xff\xfe\x00\x00", "utf-32"),
    (b"\x00\x00\xfe\xff", "utf-32"),
    (b"\xef\xbb\xbf", "utf-8-sig"),
    (b"\xff\xfe", "utf-16"),
    (b"\xfe\xff", "utf-16"),
)
# Trailing copy markers: "dog (1)", "dog(2)", "dog_01", "dog-002", "dog 3", "dog - Copy", "dog - Copy (2)".
_COPY_MARKER = re.compile(r"(?:\s*\(\d+\)|[\s_\-]+\d+|\s+-\s+copy)$", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"\[PX\]|\[P\]")


def _decode(data: bytes) -> str:
    """Bytes of a text file -> str: BOM first, then UTF-8, BOM-less UTF-16, cp1252, latin-1 (never fails)."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return data.decode(encoding, errors="replace")
    if b"\x00" in data and len(data) % 2 == 0:  # BOM-less UTF-16: ASCII text has a zero in every other byte
        even_zeros, odd_zeros = data[0::2].count(0), data[1::2].count(0)
        encoding = "utf-16-le" if odd_zeros > even_zeros else "utf-16-be"
        return data.decode(encoding, errors="replace")
    for encoding in ("utf-8", "cp1252"):
        try:
            return data.decode(encoding)
        except UnicodeDecodeError:
            pass
    return data.decode("latin-1")


def _collapse(text: str) -> str:
    """Every run of whitespace or control characters becomes one space; ends stripped."""
    text = "".join(" " if (ch < " " or ch == "\x7f" or ch == "\ufeff") else ch for ch in text)
    return " ".join(text.split())


def read_caption_file(image_path) -> str | None:
    """The caption in ``IMAGE.txt`` beside ``image_path`` (same stem), whitespace collapsed.

    Returns None when there is no such file or it holds only whitespace. Odd encodings never raise; a caption file
    that exists but cannot be read (permissions) raises :class:`DreamBoothError`.
    """
    caption_path = Path(image_path).with_suffix(".txt")
    if not caption_path.is_file():
        return None
    try:
        data = caption_path.read_bytes()
    except OSError as exc:
        raise DreamBoothError(f"{caption_path}: caption file cannot be read ({exc.strerror or exc})") from exc
    return _collapse(_decode(data)) or None


def caption_from_filename(image_path) -> str:
    """A caption from the file name: ``"a_photo-of dog (1).png"`` -> ``"a photo of dog"``.

    Trailing copy markers are removed, underscores and dashes become spaces, spaces are collapsed. A name that is
    nothing but a marker (``"001.png"``) is kept as it is rather than becoming empty.
    """
    stem = Path(image_path).stem
    cleaned = stem
    while (stripped := _COPY_MARKER.sub("", cleaned)) != cleaned:
        cleaned = stripped
    caption = _collapse(re.sub(r"[_\-]+", " ", cleaned))
    return caption or _collapse(re.sub(r"[_\-]+", " ", stem))


def image_caption(image_path, source: str) -> str | None:
    """The caption of ``image_path`` from ``source`` (one of :data:`CAPTION_SOURCES`); None for ``"prompt"``."""
    if source not in CAPTION_SOURCES:
        raise ValueError(f"unknown caption source {source!r}; expected one of {', '.join(CAPTION_SOURCES)}")
    if source == "txt":
        return read_caption_file(image_path)
    if source == "filename":
        return caption_from_filename(image_path)
    return None


def _tidy(text: str) -> str:
    """Collapse spaces and remove the ``", "`` artefacts that empty parts leave behind."""
    text = " ".join(text.split())
    text = re.sub(r"\s+,", ",", text)  # "a , b" -> "a, b"
    text = re.sub(r",(?:\s*,)+", ",", text)  # "a, , b" -> "a, b"
    return text.strip(" ,")


def render_prompt(prompt: str, caption: str | None, template: str = "[PX][P]") -> str:
    """The prompt an image trains with.

    ``prompt``: the instance (or class) prompt. ``caption``: the image's caption, or None. ``template``: how the two
    combine, ``[PX]`` standing for ``prompt`` and ``[P]`` for ``caption``; adjacent placeholders are joined with
    ``", "``, other text is kept literally. When ``prompt`` contains ``[filewords]``, the caption replaces it and the
    template is not used; otherwise an empty caption leaves ``prompt`` as it is.
    """
    if "[filewords]" in prompt:
        return _tidy(prompt.replace("[filewords]", caption or ""))
    if not caption or not caption.strip():
        return _tidy(prompt)
    template = template.replace("[PX][P]", "[PX], [P]").replace("[P][PX]", "[P], [PX]")
    values = {"[PX]": prompt, "[P]": caption}
    return _tidy(_PLACEHOLDER.sub(lambda match: values[match.group(0)], template))


def folder_captions(folder) -> list[tuple[Path, str]]:
    """Every image under ``folder`` with its ``IMAGE.txt`` caption ('' when it has none), for the caption editor."""
    from .images import list_images

    return [(path, read_caption_file(path) or "") for path in list_images(folder)]


def replace_in_captions(captions: list[str], find: str, replace: str) -> tuple[list[str], int]:
    """Bulk find / replace (plain text, case-sensitive); returns the new captions and how many changed."""
    if not find:
        return list(captions), 0
    changed = [c.replace(find, replace) for c in captions]
    return changed, sum(a != b for a, b in zip(captions, changed))


def save_captions(rows: list[tuple[Path, str]]) -> int:
    """Write ``IMAGE.txt`` for each (image, caption) whose caption differs from the file's; returns how many.

    UTF-8, written atomically; an empty caption removes nothing (it writes an empty file only if one existed).
    """
    from ..models.files import atomic_path

    written = 0
    for image, caption in rows:
        path = Path(image).with_suffix(".txt")
        current = read_caption_file(image)
        if (current or "") == caption or (current is None and not caption):
            continue
        with atomic_path(path) as temp:
            temp.write_text(caption, encoding="utf-8")
        written += 1
    return written
