"""The tab's memory estimate: which settings refresh it, and one estimate at a time, the newest wins.

Each refresh is a dry run of seconds (:mod:`dreambooth.memory.estimate`), and one edit can fire several change
events (the page's load fills every widget at once; a number typed digit by digit): the estimates run one at a time,
a request that is no longer the newest when its turn comes answers nothing (the newer one will), and answers are
kept by the settings they describe, so going back to a configuration costs nothing.  No gradio here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from ..memory.report import fit_markdown
from ..settings import Settings

# The settings an estimate depends on; those this version lacks are skipped by the layout.
MEMORY_FIELDS = (
    "pretrained_model_name_or_path",
    "resolution",
    "train_batch_size",
    "mixed_precision",
    "gradient_checkpointing",
    "optimizer",
    "fused_backward",
    "full_bf16",
    "train_text_encoder",
    "with_prior_preservation",
    "cache_latents",
    "low_memory",
    "gpu_memory_gb",
)
KEEP = 32  # answers remembered


class MemoryPanel:
    """``markdown(settings)``: the panel's text for ``settings``, or None when a newer request superseded it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._newest: Any = None
        self._answers: OrderedDict[Any, str] = OrderedDict()

    @staticmethod
    def _key(settings: Settings) -> Any:
        try:  # a model file rewritten in place is another model
            stat = Path(settings.pretrained_model_name_or_path).stat()
            version = (stat.st_mtime_ns, stat.st_size)
        except (OSError, ValueError):
            version = None
        return settings.to_json(), version

    def markdown(self, settings: Settings) -> str | None:
        key = self._key(settings)
        self._newest = key
        with self._lock:
            if key in self._answers:
                self._answers.move_to_end(key)
                return self._answers[key]
            if key != self._newest:
                return None
            text = fit_markdown(settings)
            self._answers[key] = text
            while len(self._answers) > KEEP:
                self._answers.popitem(last=False)
            return text
