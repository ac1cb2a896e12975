"""Mirrors ``modules/deepbooru.py`` (v1.10.1): ``DeepDanbooru`` and its one instance ``model``.

Same methods and control flow: ``load()`` (once; on the CPU in ``devices.dtype``), ``start()`` (``load()`` + to
``devices.device``), ``stop()`` (back to the CPU and ``torch_gc()`` unless ``opts.interrogate_keep_models_in_memory``),
``tag()`` (start + ``tag_multi`` + stop) and ``tag_multi(pil_image, force_disable_ranks=False)`` with the real
post-processing of the scores (``interrogate_deepbooru_score_threshold``, ``rating:`` tags dropped,
``deepbooru_sort_alpha``, ``deepbooru_filter_tags``, ``deepbooru_use_spaces``, ``deepbooru_escape``,
``interrogate_return_ranks``). Simplified: the network is a ``FakeDeepDanbooruModel`` built without a file or a
download, whose scores for any image are ``fake_scores`` (tag -> probability). Each method is recorded as
``deepbooru.NAME`` with ``queue_lock_held`` (the calling thread holds ``call_queue.queue_lock``) and, for
``tag_multi``, where the model was. ``reset()`` (fake only, called by ``fake.reset``) unloads ``model`` in place.
"""

from __future__ import annotations

import re
import threading
from typing import Any

import torch

from modules import devices, fake, shared

re_special = re.compile(r"([\\()])")
DEFAULT_SCORES = {"1girl": 0.98, "solo": 0.95, "smile": 0.8, "rating:safe": 0.9, "blue_sky": 0.6, "hat_(object)": 0.55}
fake_scores: dict[str, float] = dict(DEFAULT_SCORES)


def _lock_held() -> bool:
    from modules import call_queue

    return call_queue.queue_lock.locked() and call_queue.queue_lock.owner == threading.get_ident()


def _record(name: str, **args: Any) -> None:
    fake.record(f"deepbooru.{name}", queue_lock_held=_lock_held(), **args)


class FakeDeepDanbooruModel(torch.nn.Module):
    """Stands in for ``deepbooru_model.DeepDanbooruModel``: ``tags`` and a forward giving ``fake_scores``."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.location = "cpu"
        self.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def to(self, *args: Any, **kwargs: Any) -> FakeDeepDanbooruModel:
        device, dtype, _non_blocking, _memory_format = torch._C._nn._parse_to(*args, **kwargs)
        target = args[0] if args else kwargs.get("device")
        if device is not None:
            self.location = "cuda" if device.type != "cpu" or target is devices.device else "cpu"
            fake.record("deepbooru_model.to", device=str(device), location=self.location)
            if device.type == "cuda" and not torch.cuda.is_available():
                return super().to(dtype) if dtype is not None else self
        return super().to(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[fake_scores.get(tag, 0.0) for tag in self.tags]] * x.shape[0])


class DeepDanbooru:
    def __init__(self) -> None:
        self.model: FakeDeepDanbooruModel | None = None

    def load(self) -> None:
        """Real: ``models/torch_deepdanbooru/model-resnet_custom_v3.pt`` (downloaded when missing) into a
        ``DeepDanbooruModel``, ``eval()``, to ``(devices.cpu, devices.dtype)``; nothing when already loaded."""
        _record("load")
        if self.model is not None:
            return

        self.model = FakeDeepDanbooruModel()
        self.model.tags = list(fake_scores)

        self.model.eval()
        self.model.to(devices.cpu, devices.dtype)

    def start(self) -> None:
        _record("start")
        self.load()
        self.model.to(devices.device)

    def stop(self) -> None:
        _record("stop")
        if not shared.opts.interrogate_keep_models_in_memory:
            self.model.to(devices.cpu)
            devices.torch_gc()

    def tag(self, pil_image: Any) -> str:
        _record("tag")
        self.start()
        res = self.tag_multi(pil_image)
        self.stop()

        return res

    def tag_multi(self, pil_image: Any, force_disable_ranks: bool = False) -> str:
        """Real: resizes to 512x512 (fill), runs the network, keeps tags over the threshold; the options decide
        order, spaces, escaping, filtering and ranks. It fails (``None`` is not callable) before ``load()``."""
        _record("tag_multi", location=getattr(self.model, "location", None), force_disable_ranks=force_disable_ranks)
        threshold = shared.opts.interrogate_deepbooru_score_threshold
        use_spaces = shared.opts.deepbooru_use_spaces
        use_escape = shared.opts.deepbooru_escape
        alpha_sort = shared.opts.deepbooru_sort_alpha
        include_ranks = shared.opts.interrogate_return_ranks and not force_disable_ranks

        pil_image.convert("RGB")  # real: images.resize_image(2, pil_image.convert("RGB"), 512, 512) -> array
        x = torch.zeros(1, 512, 512, 3)
        with torch.no_grad():
            y = self.model(x)[0].detach().cpu().numpy()

        probability_dict = {}

        for tag, probability in zip(self.model.tags, y):
            if probability < threshold:
                continue

            if tag.startswith("rating:"):
                continue

            probability_dict[tag] = probability

        if alpha_sort:
            tags = sorted(probability_dict)
        else:
            tags = [tag for tag, _ in sorted(probability_dict.items(), key=lambda x: -x[1])]

        res = []

        filtertags = {x.strip().replace(" ", "_") for x in shared.opts.deepbooru_filter_tags.split(",")}

        for tag in [x for x in tags if x not in filtertags]:
            probability = probability_dict[tag]
            tag_outformat = tag
            if use_spaces:
                tag_outformat = tag_outformat.replace("_", " ")
            if use_escape:
                tag_outformat = re.sub(re_special, r"\\\1", tag_outformat)
            if include_ranks:
                tag_outformat = f"({tag_outformat}:{probability:.3f})"

            res.append(tag_outformat)

        return ", ".join(res)


model = DeepDanbooru()


def reset() -> None:
    """Fake only: default scores, ``model`` unloaded (the same object, so ``from modules.deepbooru import model``
    stays valid)."""
    fake_scores.clear()
    fake_scores.update(DEFAULT_SCORES)
    model.__init__()
