"""Mirrors ``modules/call_queue.py`` (v1.10.1).

``queue_lock`` is a ``fifo_lock.FIFOLock`` as in the real WebUI (non-reentrant; every generation and every
``wrap_queued_call`` holds it). ``wrap_gradio_gpu_call`` keeps the real order (task id, lock, ``state.begin``, call,
``state.end``) but has no progress-API bookkeeping and no timing/VRAM HTML; like the real one it turns an exception
into ``extra_outputs + ["<div class='error'>...</div>"]`` instead of raising.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from functools import wraps
from typing import Any

from modules import devices, fake, fifo_lock

queue_lock = fifo_lock.FIFOLock()


def wrap_queued_call(func: Callable[..., Any]) -> Callable[..., Any]:
    def f(*args: Any, **kwargs: Any) -> Any:
        with queue_lock:
            res = func(*args, **kwargs)

        return res

    return f


def wrap_gradio_gpu_call(func: Callable[..., Any], extra_outputs: list[Any] | None = None) -> Callable[..., Any]:
    @wraps(func)
    def f(*args: Any, **kwargs: Any) -> Any:
        from modules import shared

        # real: a first argument "task(...)" is a job id for the progress API
        if args and type(args[0]) is str and args[0].startswith("task(") and args[0].endswith(")"):
            id_task = args[0]
        else:
            id_task = None

        with queue_lock:
            shared.state.begin(job=id_task)
            try:
                res = func(*args, **kwargs)
            finally:
                fake.record("call_queue.task_finished", id_task=id_task)

            shared.state.end()

        return res

    return wrap_gradio_call(f, extra_outputs=extra_outputs, add_stats=True)


def wrap_gradio_call(
    func: Callable[..., Any], extra_outputs: list[Any] | None = None, add_stats: bool = False
) -> Callable[..., Any]:
    @wraps(func)
    def f(*args: Any, **kwargs: Any) -> Any:
        from modules import shared

        try:
            res = func(*args, **kwargs)
        finally:
            shared.state.skipped = False
            shared.state.interrupted = False
            shared.state.stopping_generation = False
            shared.state.job_count = 0
            shared.state.job = ""
        return res

    return wrap_gradio_call_no_job(f, extra_outputs, add_stats)


def wrap_gradio_call_no_job(
    func: Callable[..., Any], extra_outputs: list[Any] | None = None, add_stats: bool = False
) -> Callable[..., Any]:
    @wraps(func)
    def f(*args: Any, extra_outputs_array: list[Any] | None = extra_outputs, **kwargs: Any) -> Any:
        from modules import errors

        try:
            res = list(func(*args, **kwargs))
        except Exception as e:
            errors.report("Error completing request", exc_info=True)
            if extra_outputs_array is None:
                extra_outputs_array = [None, ""]
            res = [*extra_outputs_array, f"<div class='error'>{html.escape(f'{type(e).__name__}: {e}')}</div>"]

        devices.torch_gc()
        return tuple(res)

    return f
