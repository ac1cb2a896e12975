"""Mirrors ``modules/devices.py`` (v1.10.1): the torch devices and dtypes the WebUI uses, and ``torch_gc``.

Real: ``device`` is the best accelerator (``cuda:N``/mps/xpu/npu) or the CPU. Fake: ``device`` is ``cuda`` when this
machine has CUDA, else ``torch.device("cpu")`` standing in for the GPU -- a *different object* from ``cpu``, which is
how the fake model tells a move "to the GPU" (``m.to(devices.device)``) from a move to the CPU on a CPU-only machine.
``torch_gc()`` is recorded in the fake call log (and really empties the CUDA cache when there is one).
"""

from __future__ import annotations

import contextlib

import torch

from modules import fake

cpu: torch.device = torch.device("cpu")
fp8: bool = False
force_fp16: bool = False
device: torch.device = torch.device("cpu")
device_interrogate: torch.device = torch.device("cpu")
dtype: torch.dtype = torch.float16
dtype_vae: torch.dtype = torch.float16
dtype_unet: torch.dtype = torch.float16
dtype_inference: torch.dtype = torch.float16
unet_needs_upcast = False


def has_mps() -> bool:
    return False


def has_xpu() -> bool:
    return False


def get_cuda_device_string() -> str:
    return "cuda"


def get_optimal_device_name() -> str:
    """Real: ``cuda``/``cuda:N``, ``mps``, ``xpu:N``, npu, else ``cpu``."""
    return get_cuda_device_string() if torch.cuda.is_available() else "cpu"


def get_optimal_device() -> torch.device:
    return torch.device(get_optimal_device_name())


def torch_gc() -> None:
    """Real: ``torch.cuda.empty_cache()`` + ``torch.cuda.ipc_collect()`` when CUDA is available; no ``gc.collect()``.
    Fake: also recorded as ``devices.torch_gc``."""
    fake.record("devices.torch_gc")
    if torch.cuda.is_available():
        with torch.cuda.device(get_cuda_device_string()):
            torch.cuda.empty_cache()
            torch.cuda.ipc_collect()


def autocast(disable: bool = False) -> contextlib.AbstractContextManager:
    """Real: ``torch.autocast("cuda")`` or a manual cast; the fake never casts."""
    return contextlib.nullcontext()


def without_autocast(disable: bool = False) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


def reset() -> None:
    """Fake only: a fresh ``device`` object and default dtypes/flags (the real ones are set by ``shared_init``)."""
    global fp8, force_fp16, device, device_interrogate, dtype, dtype_vae, dtype_unet, dtype_inference
    global unet_needs_upcast
    from modules import shared

    fp8 = False
    force_fp16 = False
    device = torch.device(get_optimal_device_name())
    device_interrogate = device
    cmd_opts = getattr(shared, "cmd_opts", None)
    no_half = bool(getattr(cmd_opts, "no_half", False))
    no_half_vae = bool(getattr(cmd_opts, "no_half_vae", False))
    dtype = torch.float32 if no_half else torch.float16
    dtype_vae = torch.float32 if no_half or no_half_vae else torch.float16
    dtype_unet = dtype
    dtype_inference = dtype
    unet_needs_upcast = False


device = torch.device(get_optimal_device_name())
