"""Mirrors ``modules/shared_state.py`` (v1.10.1): ``State``, the object behind ``shared.state``.

Same attributes and methods. Simplified: no logging, no server-command event; ``do_set_current_image`` (which decodes
``current_latent`` with the sampler code) does nothing. ``begin``/``end``/``interrupt``/``skip``/``stop_generating``
and ``assign_current_image`` are recorded in the fake call log.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

from modules import devices, fake


class State:
    skipped = False
    interrupted = False
    stopping_generation = False
    job = ""
    job_no = 0
    job_count = 0
    processing_has_refined_job_count = False
    job_timestamp = "0"
    sampling_step = 0
    sampling_steps = 0
    current_latent = None
    current_image = None
    current_image_sampling_step = 0
    id_live_preview = 0
    textinfo = None
    time_start = None
    server_start = None
    server_command = None

    def __init__(self) -> None:
        self.server_start = time.time()

    @property
    def need_restart(self) -> bool:
        return self.server_command == "restart"

    def request_restart(self) -> None:
        self.interrupt()
        self.server_command = "restart"

    def skip(self) -> None:
        fake.record("state.skip")
        self.skipped = True

    def interrupt(self) -> None:
        fake.record("state.interrupt")
        self.interrupted = True

    def stop_generating(self) -> None:
        fake.record("state.stop_generating")
        self.stopping_generation = True

    def nextjob(self) -> None:
        self.job_no += 1
        self.sampling_step = 0
        self.current_image_sampling_step = 0

    def dict(self) -> dict[str, Any]:
        return {
            "skipped": self.skipped,
            "interrupted": self.interrupted,
            "stopping_generation": self.stopping_generation,
            "job": self.job,
            "job_count": self.job_count,
            "job_timestamp": self.job_timestamp,
            "job_no": self.job_no,
            "sampling_step": self.sampling_step,
            "sampling_steps": self.sampling_steps,
        }

    def begin(self, job: str = "(unknown)") -> None:
        fake.record("state.begin", job=job)
        self.sampling_step = 0
        self.time_start = time.time()
        self.job_count = -1
        self.processing_has_refined_job_count = False
        self.job_no = 0
        self.job_timestamp = datetime.datetime.now().strftime("%Y%m%d%H%M%S")
        self.current_latent = None
        self.current_image = None
        self.current_image_sampling_step = 0
        self.id_live_preview = 0
        self.skipped = False
        self.interrupted = False
        self.stopping_generation = False
        self.textinfo = None
        self.job = job
        devices.torch_gc()

    def end(self) -> None:
        fake.record("state.end", job=self.job)
        _ = time.time() - self.time_start  # real: logs the duration (so begin() must come first)
        self.job = ""
        self.job_count = 0
        devices.torch_gc()

    def set_current_image(self) -> None:
        """Real: every ``opts.show_progress_every_n_steps`` steps, decodes ``current_latent`` into ``current_image``."""
        from modules import shared

        if not shared.parallel_processing_allowed:
            return
        every = shared.opts.show_progress_every_n_steps
        due = self.sampling_step - self.current_image_sampling_step >= every
        if due and shared.opts.live_previews_enable and every != -1:
            self.do_set_current_image()

    def do_set_current_image(self) -> None:
        """Real: decodes ``current_latent`` with the VAE; the fake does nothing."""

    def assign_current_image(self, image: Any) -> None:
        from modules import shared

        fake.record("state.assign_current_image")
        if shared.opts.live_previews_image_format == "jpeg" and image.mode in ("RGBA", "P"):
            image = image.convert("RGB")
        self.current_image = image
        self.id_live_preview += 1


def reset_state(state: State) -> None:
    """Fake only: back to a fresh ``State`` in place."""
    state.__dict__.clear()
    state.__init__()
