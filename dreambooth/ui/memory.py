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

from ..memory.fit import Superseded
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
    "training_method",
    "network_rank",
    "network_conv_rank",
    "network_train_text_encoder",
    "with_prior_preservation",
    "cache_latents",
    "low_memory",
    "gpu_memory_gb",
)
KEEP = 32  # answers remembered


class MemoryPanel:
    """``markdown(settings, quick)``: the panel's text for ``settings``, or None when a newer request superseded it
    (also while it ran: the search stops before its next dry run).  ``quick``: the estimate alone, first."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._newest: Any = None
        self._answers: OrderedDict[Any, str] = OrderedDict()
        self._estimates: dict[Any, Any] = {}  # shared by every search: a configuration is estimated once

    @staticmethod
    def _key(settings: Settings) -> Any:
        try:  # a model file rewritten in place is another model
            stat = Path(settings.pretrained_model_name_or_path).stat()
            version = (stat.st_mtime_ns, stat.st_size)
        except (OSError, ValueError):
            version = None
        return settings.to_json(), version

    def markdown(self, settings: Settings, quick: bool = False) -> str | None:
        key = self._key(settings)
        self._newest = key
        with self._lock:
            if (key, quick) in self._answers:
                self._answers.move_to_end((key, quick))
                return self._answers[(key, quick)]
            if key != self._newest:
                return None
            if len(self._estimates) > KEEP * 8 or key[1] != getattr(self, "_version", key[1]):
                self._estimates.clear()  # bounded, and none of another version of the model file
            self._version = key[1]
            try:
                text = fit_markdown(
                    settings, memo=self._estimates, quick=quick, should_stop=lambda: self._newest != key
                )
            except Superseded:
                return None
            self._answers[(key, quick)] = text
            while len(self._answers) > KEEP:
                self._answers.popitem(last=False)
            return text
