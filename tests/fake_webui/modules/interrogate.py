"""Mirrors ``modules/interrogate.py`` (v1.10.1): ``InterrogateModels``, the object behind ``shared.interrogator``.

Same class attributes (``blip_model``, ``clip_model``, ``clip_preprocess``, ``dtype``, ``running_on_cpu``) and
methods (``load_blip_model``, ``load_clip_model``, ``load``, ``send_clip_to_ram``, ``send_blip_to_ram``, ``unload``,
``generate_caption``, ``interrogate``) with the real control flow (half precision unless ``--no-half`` or on the
CPU, ``interrogate_keep_models_in_memory``, ``torch_gc``). Simplified: the models are ``FakeInterrogatorModel``\\ s
(one tiny parameter, ``location`` like the fake SD model) made without files or downloads; ``generate_caption``
returns ``fake_caption``; ``interrogate`` appends ``fake_clip_tags`` instead of ranking CLIP categories.
Each method is recorded as ``interrogate.NAME`` with ``queue_lock_held`` (the calling thread holds
``call_queue.queue_lock``); ``blip.generate`` also records where the model was. ``reset()`` (fake only, called by
``fake.reset``) puts ``shared.interrogator`` back to a fresh, unloaded state in place.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from modules import devices, fake, shared

blip_image_eval_size = 384
clip_model_name = "ViT-L/14"
fake_caption = "a photo of a thing"
fake_clip_tags = ("a detailed painting", "trending on artstation")


def _lock_held() -> bool:
    from modules import call_queue

    return call_queue.queue_lock.locked() and call_queue.queue_lock.owner == threading.get_ident()


def _record(name: str, **args: Any) -> None:
    fake.record(f"interrogate.{name}", queue_lock_held=_lock_held(), **args)


class FakeInterrogatorModel(torch.nn.Module):
    """Stands in for BLIP's ``blip_decoder`` / CLIP's model: ``location`` is ``"cuda"`` or ``"cpu"``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.location = "cpu"
        self.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def to(self, *args: Any, **kwargs: Any) -> FakeInterrogatorModel:
        device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args, **kwargs)
        target = args[0] if args else kwargs.get("device")
        if device is not None:
            simulated = target is devices.device_interrogate or target is devices.device  # the fake GPU
            self.location = "cuda" if device.type != "cpu" or simulated else "cpu"
            fake.record(f"{self.name}.to", device=str(device), location=self.location)
            if device.type == "cuda" and not torch.cuda.is_available():
                return super().to(dtype) if dtype is not None else self
        return super().to(*args, **kwargs)

    def generate(self, image: Any, sample: bool = False, num_beams: int = 1, min_length: int = 5, max_length: int = 20):
        """Real (BLIP ``blip_decoder.generate``): a list with one caption per image."""
        fake.record(f"{self.name}.generate", location=self.location, queue_lock_held=_lock_held(), num_beams=num_beams)
        return [fake_caption]


class InterrogateModels:
    blip_model = None
    clip_model = None
    clip_preprocess = None
    dtype = None
    running_on_cpu = None

    def __init__(self, content_dir: str) -> None:
        self.loaded_categories = None
        self.skip_categories: list[str] = []
        self.content_dir = content_dir
        self.running_on_cpu = devices.device_interrogate == torch.device("cpu")

    def load_blip_model(self) -> FakeInterrogatorModel:
        """Real: ``models.blip.blip_decoder(pretrained=models/BLIP/model_base_caption_capfilt_large.pth, ...)``
        (downloaded when missing), ``eval()``; on the CPU."""
        _record("load_blip_model")
        return FakeInterrogatorModel("blip").eval()

    def load_clip_model(self) -> tuple[FakeInterrogatorModel, Any]:
        """Real: ``clip.load("ViT-L/14", download_root=cmd_opts.clip_models_path)`` (downloaded when missing), moved
        to ``devices.device_interrogate``."""
        _record("load_clip_model")
        model = FakeInterrogatorModel("clip").eval()
        model = model.to(devices.device_interrogate)
        return model, (lambda image: torch.zeros(3, 224, 224))

    def load(self) -> None:
        """Real: loads BLIP and CLIP when not loaded (halved unless ``--no-half`` or on the CPU), moves both to
        ``devices.device_interrogate``, sets ``dtype`` from CLIP's first parameter."""
        _record("load")
        if self.blip_model is None:
            self.blip_model = self.load_blip_model()
            if not shared.cmd_opts.no_half and not self.running_on_cpu:
                self.blip_model = self.blip_model.half()

        self.blip_model = self.blip_model.to(devices.device_interrogate)

        if self.clip_model is None:
            self.clip_model, self.clip_preprocess = self.load_clip_model()
            if not shared.cmd_opts.no_half and not self.running_on_cpu:
                self.clip_model = self.clip_model.half()

        self.clip_model = self.clip_model.to(devices.device_interrogate)

        self.dtype = next(iter(self.clip_model.parameters())).dtype  # real: torch_utils.get_param(...).dtype

    def send_clip_to_ram(self) -> None:
        _record("send_clip_to_ram")
        if not shared.opts.interrogate_keep_models_in_memory and self.clip_model is not None:
            self.clip_model = self.clip_model.to(devices.cpu)

    def send_blip_to_ram(self) -> None:
        _record("send_blip_to_ram")
        if not shared.opts.interrogate_keep_models_in_memory and self.blip_model is not None:
            self.blip_model = self.blip_model.to(devices.cpu)

    def unload(self) -> None:
        _record("unload")
        self.send_clip_to_ram()
        self.send_blip_to_ram()

        devices.torch_gc()

    def generate_caption(self, pil_image: Any) -> str:
        """Real: resizes to 384 px, normalises, casts to ``self.dtype`` on ``device_interrogate`` and runs
        ``blip_model.generate(sample=False, num_beams=opts.interrogate_clip_num_beams, min_length=...,
        max_length=...)``; returns ``caption[0]``. It fails (AttributeError on ``None``) when BLIP is not loaded."""
        _record("generate_caption", size=getattr(pil_image, "size", None), dtype=self.dtype)
        if self.dtype is None:
            raise TypeError("type() got None: generate_caption called before load() set dtype")  # real: .type(None)
        caption = self.blip_model.generate(
            pil_image,
            sample=False,
            num_beams=shared.opts.interrogate_clip_num_beams,
            min_length=shared.opts.interrogate_clip_min_length,
            max_length=shared.opts.interrogate_clip_max_length,
        )
        return caption[0]

    def interrogate(self, pil_image: Any) -> str:
        """Real: ``state.begin(job="interrogate")``, ``lowvram.send_everything_to_cpu()``, ``load()``, BLIP caption,
        ``send_blip_to_ram()``, then CLIP's best category matches appended (``", match"``); errors are reported and
        give ``"<error>"``; ``unload()``, ``state.end()``. Fake: the matches are ``fake_clip_tags``."""
        from modules import errors

        _record("interrogate")
        res = ""
        shared.state.begin(job="interrogate")
        try:
            devices.torch_gc()
            self.load()
            caption = self.generate_caption(pil_image)
            self.send_blip_to_ram()
            devices.torch_gc()
            res = caption
            for match in fake_clip_tags:
                res += f", {match}"
        except Exception:
            errors.report("Error interrogating", exc_info=True)
            res += "<error>"

        self.unload()
        shared.state.end()

        return res


def reset() -> None:
    """Fake only: default outputs, and ``shared.interrogator`` fresh (nothing loaded), in place."""
    global fake_caption, fake_clip_tags
    fake_caption = "a photo of a thing"
    fake_clip_tags = ("a detailed painting", "trending on artstation")
    interrogator = shared.interrogator
    if interrogator is None:
        shared.interrogator = InterrogateModels("interrogate")
        return
    content_dir = interrogator.content_dir
    vars(interrogator).clear()
    interrogator.__init__(content_dir)
