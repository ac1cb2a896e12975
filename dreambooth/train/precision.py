"""The precision of the frozen modules (the VAE, a frozen text encoder) while they fill the caches under low_memory.

Decision: with ``low_memory`` on a CUDA device and mixed precision fp16 or bf16, the frozen modules encode the
latents and the text embeddings in that dtype (half their weights' memory, faster).  The VAE takes fp16 too: the
SD 1.x / 2.x VAE *encoder* stays in fp16's range at training resolutions (what overflows in fp16 is the SDXL VAE and
decoding at high resolution; a future SDXL family keeps its VAE in fp32).  Cached latents and embeddings are stored in
fp32.  Afterwards the modules get their exact fp32 weights back (kept in CPU memory meanwhile), so checkpoints and
samples are unchanged; they then wait on the CPU until samples or saves need them.  Without mixed precision, on the
CPU, or with ``cache_latents`` off (the VAE then encodes every step, in fp32), nothing changes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def frozen_dtype(low_memory: bool, device_type: str, mixed_precision: str) -> str | None:
    """``"fp16"`` / ``"bf16"`` when the frozen modules fill the caches in half precision, else None (fp32)."""
    if low_memory and device_type == "cuda" and mixed_precision in ("fp16", "bf16"):
        return mixed_precision
    return None


@contextlib.contextmanager
def in_dtype(modules: list[Any], dtype_name: str | None) -> Iterator[None]:
    """Run ``modules`` in ``dtype_name`` (None: as they are); afterwards they hold their exact fp32 weights again,
    wherever they were moved meanwhile."""
    if dtype_name is None or not modules:
        yield
        return
    import torch

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype_name]
    saved = [{k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items()} for m in modules]
    for module in modules:
        module.to(dtype)
    try:
        yield
    finally:
        for module, state in zip(modules, saved):
            module.to(torch.float32)
            module.load_state_dict(state)
