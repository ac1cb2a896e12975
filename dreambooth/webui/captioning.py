"""Captioning with the WebUI's own interrogators (BLIP, DeepDanbooru), loaded for one job and unloaded after.

Facts of AUTOMATIC1111 v1.10.1 this relies on (measured on its source):
- ``shared.interrogator`` is a ``modules.interrogate.InterrogateModels`` made by ``shared_init.initialize()``.
  Its ``load()`` loads BLIP *and* CLIP ViT-L/14 (downloading CLIP on first use); BLIP is made by
  ``load_blip_model()`` (``models/BLIP/model_base_caption_capfilt_large.pth``, downloaded by the WebUI when missing),
  halved unless ``--no-half`` or ``running_on_cpu``, moved to ``devices.device_interrogate``; ``dtype`` (read by
  ``generate_caption``) is then the loaded models' parameter dtype. ``generate_caption(pil_image)`` returns BLIP's
  caption alone (``interrogate()`` appends CLIP's artist/flavour guesses). ``unload()`` = ``send_clip_to_ram()`` +
  ``send_blip_to_ram()`` (both do nothing when ``opts.interrogate_keep_models_in_memory``) + ``devices.torch_gc()``.
  We load the BLIP half of ``load()`` only: a caption does not need CLIP in VRAM, nor its download.
- ``modules.deepbooru.model`` is a ``DeepDanbooru``: ``start()`` loads it (``models/torch_deepdanbooru``) and moves it
  to ``devices.device``; ``tag_multi(pil_image, force_disable_ranks=False)`` tags an image (threshold, spaces,
  escaping, filter and sorting from ``opts``); ``stop()`` moves it back to the CPU (unless kept in memory) and
  ``torch_gc()``s. ``tag()`` = start + tag_multi + stop per image, so a folder uses start / tag_multi / stop.
- ``call_queue.queue_lock`` is a non-reentrant ``FIFOLock`` (``acquire(blocking=True)``, no timeout): a job holds it
  from start to end so txt2img waits; nothing that takes it again (``opts.set`` of a model option,
  ``wrap_queued_call``) may be called inside. The REST ``/sdapi/v1/interrogate`` and the Extras tab's Caption run
  under it too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..data.captioning import CaptionReport, caption_folder, images_to_caption
from ..errors import DreamBoothError

KINDS = ("blip", "deepbooru")
JOB_NAME = "dreambooth-caption"


def _modules() -> Any:
    from modules import call_queue, devices, errors, shared

    return call_queue, devices, errors, shared


class WebuiCaptioner:
    """A captioner for :func:`..data.captioning.caption_folder`, valid inside :func:`webui_captioner` only."""

    def __init__(self, kind: str):
        self.kind = kind
        self.active = False

    def __call__(self, image: Any) -> str:
        """The caption (BLIP) or tags (DeepDanbooru) of one ``PIL.Image``."""
        if not self.active:
            raise DreamBoothError(
                "the WebUI captioner was used outside its 'with webui_captioner(...)' block; the model is not loaded "
                "then: caption inside the block."
            )
        _, _, _, shared = _modules()
        if self.kind == "blip":
            return shared.interrogator.generate_caption(image.convert("RGB"))
        from modules import deepbooru

        return deepbooru.model.tag_multi(image, force_disable_ranks=True)  # ranks "(tag:0.9)" are no caption

    def interrupted(self) -> bool:
        """True once the WebUI's Interrupt (or Skip-all) was pressed during the job: pass as ``should_stop``."""
        _, _, _, shared = _modules()
        state = shared.state
        return bool(state.interrupted or getattr(state, "stopping_generation", False))


def _load_blip(shared: Any, devices: Any) -> None:
    """The BLIP half of ``InterrogateModels.load()`` (v1.10.1), with ``dtype`` taken from BLIP instead of CLIP."""
    interrogator = shared.interrogator
    if interrogator is None:
        raise DreamBoothError(
            "the WebUI has no interrogator (shared.interrogator is None): it is not fully started; try again once "
            "the WebUI has finished loading."
        )
    if interrogator.blip_model is None:
        interrogator.blip_model = interrogator.load_blip_model()
        if not shared.cmd_opts.no_half and not interrogator.running_on_cpu:
            interrogator.blip_model = interrogator.blip_model.half()
    interrogator.blip_model = interrogator.blip_model.to(devices.device_interrogate)
    interrogator.dtype = next(iter(interrogator.blip_model.parameters())).dtype


def _unload_blip(shared: Any) -> None:
    if shared.interrogator is not None:
        shared.interrogator.unload()


def _start_deepbooru() -> None:
    from modules import deepbooru

    deepbooru.model.start()


def _stop_deepbooru() -> None:
    from modules import deepbooru

    if deepbooru.model.model is not None:  # start() failed before loading: nothing to move back
        deepbooru.model.stop()


@contextlib.contextmanager
def webui_captioner(kind: str = "blip", wait: bool = True) -> Iterator[WebuiCaptioner]:
    """Hold the WebUI's queue lock, load its ``kind`` interrogator, yield a captioner; unload and release after.

    ``kind``: ``"blip"`` (``shared.interrogator``'s BLIP) or ``"deepbooru"`` (``modules.deepbooru.model``).
    ``wait``: wait for a running generation (or training job) to end; False raises :class:`DreamBoothError` at once
    when the queue is busy. The model is unloaded (as the WebUI's own Interrogate buttons do) whatever happens,
    also when loading it or the body fails. Inside the block, nothing may take ``queue_lock`` again.
    """
    if kind not in KINDS:
        raise DreamBoothError(f"unknown WebUI captioner {kind!r}; use one of {', '.join(KINDS)}.")
    call_queue, devices, errors, shared = _modules()
    if not call_queue.queue_lock.acquire(blocking=wait):
        raise DreamBoothError(
            "the WebUI is busy (a generation or a training job holds its queue): caption after it ends."
        )
    captioner = WebuiCaptioner(kind)
    try:
        shared.state.begin(job=JOB_NAME)
        failed = False
        try:
            if kind == "blip":
                _load_blip(shared, devices)
            else:
                _start_deepbooru()
            captioner.active = True
            yield captioner
        except BaseException:
            failed = True
            raise
        finally:
            captioner.active = False
            try:
                if kind == "blip":
                    _unload_blip(shared)
                else:
                    _stop_deepbooru()
            except Exception:
                if not failed:
                    raise
                errors.report(f"DreamBooth: unloading the WebUI's {kind} captioner failed", exc_info=True)
            shared.state.end()
    finally:
        call_queue.queue_lock.release()


def webui_caption_folder(
    folder: str | os.PathLike,
    kind: str = "blip",
    prefix: str = "",
    suffix: str = "",
    overwrite: bool = False,
    dedupe_tags: bool = True,
    progress: Callable[[int, int, Path], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    wait: bool = True,
) -> CaptionReport:
    """:func:`..data.captioning.caption_folder` with the WebUI's ``kind`` interrogator (see :func:`webui_captioner`).

    The model is not loaded (and the queue not taken) when every image already has its caption and not
    ``overwrite``. The WebUI's Interrupt stops the run between images, as ``should_stop`` does. Progress is shown
    in the WebUI's progress bar too.
    """
    if kind not in KINDS:
        raise DreamBoothError(f"unknown WebUI captioner {kind!r}; use one of {', '.join(KINDS)}.")
    if not images_to_caption(folder, overwrite=overwrite):
        return caption_folder(folder, lambda image: "", prefix, suffix, overwrite, dedupe_tags, progress, should_stop)
    _, _, _, shared = _modules()

    def report_progress(done: int, total: int, image: Path) -> None:
        shared.state.job_count, shared.state.job_no = total, done
        shared.state.textinfo = f"DreamBooth: captioning {done}/{total} ({image.name})"
        if progress is not None:
            progress(done, total, image)

    with webui_captioner(kind, wait=wait) as captioner:

        def stop() -> bool:
            return captioner.interrupted() or bool(should_stop is not None and should_stop())

        return caption_folder(folder, captioner, prefix, suffix, overwrite, dedupe_tags, report_progress, stop)
