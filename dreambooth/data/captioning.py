"""Writing ``IMAGE.txt`` captions beside training images, with any captioner.

:func:`caption_folder` runs a captioner (any callable ``PIL.Image -> str``) over every image of a folder and writes
the caption beside it (``dog.png`` -> ``dog.txt``, UTF-8, atomically), the file the ``"txt"`` caption source reads.
It writes nothing else and never touches the images; an image that cannot be read is reported, not fatal.
:class:`BlipCaptioner` is a local BLIP model (transformers) that is only ever read from disk: a folder, or a model id
already in the Hugging Face cache. The WebUI's own interrogators are in ``dreambooth/webui/captioning.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DreamBoothError
from ..models.files import atomic_path
from .images import ImageError, ImageProblem, list_images, load_image

DEFAULT_BLIP_ID = "Salesforce/blip-image-captioning-base"
# A saved BlipForConditionalGeneration + BlipProcessor: the model's config and the processor's (transformers 4.x
# writes preprocessor_config.json, 5.x processor_config.json).
BLIP_CONFIGS = (("config.json",), ("preprocessor_config.json", "processor_config.json"))

Captioner = Callable[[Any], str]
"""Anything that turns an RGB ``PIL.Image`` into a caption."""


@dataclass
class CaptionReport:
    """What :func:`caption_folder` did, image by image.

    ``written``: the caption files written; ``kept``: the caption files that already existed and were left alone;
    ``failed``: images that got no caption, each with the reason; ``cancelled``: ``should_stop()`` ended the run
    early (the images after that point are in none of the lists).
    """

    folder: Path
    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)
    failed: list[ImageProblem] = field(default_factory=list)
    cancelled: bool = False

    def summary(self) -> str:
        """One line for a log or a status box, e.g. ``"3 caption(s) written, 1 kept (already there), 0 failed"``."""
        kept = f"{len(self.kept)} kept (already there)"
        text = f"{len(self.written)} caption(s) written, {kept}, {len(self.failed)} failed"
        return f"{text}; cancelled before the end" if self.cancelled else text


def caption_path(image_path: str | os.PathLike) -> Path:
    """The caption file of an image: same folder, same stem, ``.txt`` (what ``read_caption_file`` reads)."""
    return Path(image_path).with_suffix(".txt")


def images_to_caption(folder: str | os.PathLike, overwrite: bool = False) -> list[Path]:
    """The images of ``folder`` (recursive, as training lists them) that would get a caption file written.

    Without ``overwrite`` an image that already has its ``.txt`` is left out. Raises :class:`DreamBoothError` when
    ``folder`` is not a folder.
    """
    return [path for path in list_images(folder) if overwrite or not caption_path(path).is_file()]


def _split_tags(text: str) -> list[str]:
    """Comma-separated parts, each with its whitespace collapsed; empty parts dropped."""
    return [tag for tag in (" ".join(part.split()) for part in text.split(",")) if tag]


def compose_caption(caption: str, prefix: str = "", suffix: str = "", dedupe_tags: bool = True) -> str:
    """``prefix, caption, suffix`` joined with ``", "`` (empty parts left out).

    With ``dedupe_tags`` the text is split on commas and a tag that appeared before (compared case-insensitively,
    the first occurrence kept) is dropped, as is a caption tag equal to a prefix or suffix tag (the prefix and suffix
    keep their place): ``compose_caption("1girl, solo, Solo, ohwx", prefix="ohwx")`` -> ``"ohwx, 1girl, solo"``.
    """
    if not dedupe_tags:
        parts = (" ".join(text.split()) for text in (prefix, caption, suffix))
        return ", ".join(part for part in parts if part)

    def unique(tags: Iterable[str], seen: set[str]) -> list[str]:
        kept = []
        for tag in tags:
            if tag.casefold() not in seen:
                seen.add(tag.casefold())
                kept.append(tag)
        return kept

    head = unique(_split_tags(prefix), set())
    tail = unique(_split_tags(suffix), {tag.casefold() for tag in head})
    body = unique(_split_tags(caption), {tag.casefold() for tag in head + tail})
    return ", ".join(head + body + tail)


def _write_caption(path: Path, text: str) -> None:
    """Write ``text`` (UTF-8, one line) to ``path`` atomically, keeping an existing file's permissions."""
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    with atomic_path(path) as temp:
        temp.write_text(text + "\n", encoding="utf-8")
        temp.chmod(mode)  # mkstemp creates 0600 files


def caption_folder(
    folder: str | os.PathLike,
    captioner: Captioner,
    prefix: str = "",
    suffix: str = "",
    overwrite: bool = False,
    dedupe_tags: bool = True,
    progress: Callable[[int, int, Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> CaptionReport:
    """Write ``IMAGE.txt`` beside every image of ``folder`` (recursive) with ``captioner``'s caption.

    ``prefix`` / ``suffix``: text put before / after every caption, joined with ``", "`` (e.g. the identifier
    ``"ohwx dog"``); ``dedupe_tags``: see :func:`compose_caption`. An existing caption file is kept unless
    ``overwrite``; the captioner is not called for it. An image that cannot be read, a captioner error, an empty
    caption, or a caption file that cannot be written goes to ``failed`` and the run goes on. ``progress(done, total,
    image)`` is called after each image; ``should_stop()`` is checked before each one (True: stop, ``cancelled``).
    Only ``.txt`` files beside the images are written; the images are never changed. Raises
    :class:`DreamBoothError` when ``folder`` is not a folder.
    """
    images = list_images(folder)
    report = CaptionReport(Path(folder))
    owners: dict[Path, Path] = {}  # caption file -> the image it was written for in this run
    for done, image_path in enumerate(images, start=1):
        if should_stop is not None and should_stop():
            report.cancelled = True
            break
        target = caption_path(image_path)
        if target in owners:
            reason = f"{target.name} is already the caption of {owners[target].name} (two images with one name)"
            report.failed.append(ImageProblem(image_path, reason))
        elif target.is_file() and not overwrite:
            report.kept.append(target)
        else:
            problem = _caption_one(image_path, target, captioner, prefix, suffix, dedupe_tags)
            if problem is None:
                owners[target] = image_path
                report.written.append(target)
            else:
                report.failed.append(ImageProblem(image_path, problem))
        if progress is not None:
            progress(done, len(images), image_path)
    return report


def _caption_one(
    image_path: Path, target: Path, captioner: Captioner, prefix: str, suffix: str, dedupe_tags: bool
) -> str | None:
    """Caption one image and write its file; returns why it failed, or None."""
    try:
        image = load_image(image_path)
    except ImageError as error:
        return error.reason
    try:
        with image:
            caption = captioner(image)
    except Exception as error:  # a captioner failing on one image must not lose the captions of the others
        return f"the captioner failed: {type(error).__name__}: {error}"
    if not isinstance(caption, str) or not caption.strip():
        return "the captioner returned no text"
    text = compose_caption(caption, prefix, suffix, dedupe_tags)
    try:
        _write_caption(target, text)
    except OSError as error:
        return f"{target.name} cannot be written ({error.strerror or error})"
    return None


# ---------------------------------------------------------------------------------------------------- local BLIP


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return str(constants.HF_HUB_CACHE)
    except (ImportError, AttributeError):
        return str(Path("~/.cache/huggingface/hub").expanduser())


def _where_to_put_it() -> str:
    return (
        f"Download {DEFAULT_BLIP_ID} (or another BLIP captioning model) into a folder and pass that folder "
        f"(--model FOLDER), or place it in the Hugging Face cache ({_hub_cache()}) and pass its id; "
        "nothing is downloaded."
    )


def _looks_like_path(text: str) -> bool:
    """True for ``./m``, ``/m``, ``~/m``, ``C:\\m``, ``a/b/c``; False for a hub id such as ``org/name``."""
    return text.startswith((".", "/", "~")) or "\\" in text or ":" in text or text.count("/") > 1


def _refuse_unsafe_weights(folder: Path) -> None:
    """Read a BLIP folder's pickled weights (``pytorch_model.bin``, sharded too) through our safe loader first.

    transformers' ``from_pretrained`` unpickles them with plain ``torch.load``, which on a torch older than 2.6 runs
    whatever the pickle asks for; a file our loader refuses is reported in one line and never reaches it.
    """
    from ..models.folders import TRANSFORMERS_WEIGHTS, _pickle_weights, _read_pickles

    _read_pickles(_pickle_weights(folder, TRANSFORMERS_WEIGHTS), "BLIP model")


class BlipCaptioner:
    """A BLIP captioning model (transformers' ``BlipForConditionalGeneration`` + ``BlipProcessor``) read from disk.

    ``path``: a folder holding the saved model and processor, or a model id (``"Salesforce/blip-image-captioning-
    base"``) already in the local Hugging Face cache; everything is loaded with ``local_files_only=True``, so
    nothing is ever downloaded. ``device``: ``"cpu"`` (float32) or an accelerator such as ``"cuda"`` (float16).
    ``max_new_tokens``: the longest caption, in tokens. Calling the captioner with an RGB ``PIL.Image`` returns its
    caption (greedy decoding, deterministic). torch and transformers are imported only here, when one is made.
    Raises :class:`DreamBoothError` when no model is found or it cannot be read.
    """

    def __init__(self, path: str | os.PathLike, device: str = "cpu", max_new_tokens: int = 40):
        self.source = str(path)
        self.device = device
        self.max_new_tokens = max_new_tokens
        location = self._locate(self.source)
        import torch
        from transformers import BlipForConditionalGeneration, BlipProcessor

        self.dtype = torch.float32 if torch.device(device).type == "cpu" else torch.float16
        if Path(location).is_dir():
            _refuse_unsafe_weights(Path(location))
        try:
            self.processor = BlipProcessor.from_pretrained(location, local_files_only=True)
            model = BlipForConditionalGeneration.from_pretrained(location, local_files_only=True)
        except (OSError, ValueError, KeyError) as error:
            where = "is not a BLIP captioning model folder" if Path(location).is_dir() else "is not in the cache"
            raise DreamBoothError(
                f"{self.source}: {where} or cannot be read ({error}). {_where_to_put_it()}"
            ) from error
        self.model = model.to(device, self.dtype).eval()

    @staticmethod
    def _locate(source: str) -> str:
        """The folder to load, or the cached model id; raises when it is plainly not there."""
        folder = Path(source).expanduser()
        if folder.is_dir():
            for names in BLIP_CONFIGS:
                if not any((folder / name).is_file() for name in names):
                    raise DreamBoothError(
                        f"{folder}: not a saved BLIP captioning model (no {' or '.join(names)}). {_where_to_put_it()}"
                    )
            return str(folder)
        if folder.exists():
            raise DreamBoothError(f"{folder}: is a file; pass the folder that holds the BLIP model's files.")
        if _looks_like_path(source):
            raise DreamBoothError(f"{folder}: no such folder. {_where_to_put_it()}")
        return source

    def __call__(self, image: Any) -> str:
        """The caption of one RGB ``PIL.Image``, whitespace collapsed."""
        import torch

        inputs = self.processor(images=image.convert("RGB"), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(self.device, self.dtype)
        with torch.inference_mode():
            tokens = self.model.generate(pixel_values=pixel_values, max_new_tokens=self.max_new_tokens)
        return " ".join(self.processor.decode(tokens[0], skip_special_tokens=True).split())
