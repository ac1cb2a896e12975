"""Live tensor bytes, counted per storage, and what they were at the peak.

:class:`MemoryTracker` is a ``TorchDispatchMode``: every tensor an operator returns is looked at, and its *storage*
(not the tensor: a view shares its base's memory) is counted once, with a ``weakref`` whose callback subtracts it
when the storage is freed.  This works for real tensors and for ``FakeTensorMode``'s fake ones alike, which is what
lets the memory estimate (``memory/dryrun.py``) and a real CPU run be measured by the same code.  Tensors that
existed before the tracker was entered (module weights, cached text embeddings) are added with :meth:`register`.

Sizes are rounded up to the CUDA caching allocator's block of 512 bytes, as ``torch.cuda.max_memory_allocated``
counts them.  What allocations inside an operator do (workspaces) and what the allocator keeps cached are not seen:
:mod:`.estimate` adds them as constants.

The breakdown at the peak: each counted storage is labelled weights (trained or frozen, by dtype), gradients,
optimizer states or activations and temporaries.  Labels are worked out from the watched modules and optimizers
just after a new peak (at the next operator or the next free, whichever comes first: by then autograd has put a new
gradient into ``.grad``); a label stays with its storage, so a gradient freed by ``zero_grad`` is still counted as a
gradient in a peak it belonged to.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

BLOCK_BYTES = 512  # the CUDA caching allocator rounds every block up to a multiple of this

ACTIVATIONS = "activations and temporaries"
GRADIENTS = "gradients"
OPTIMIZER_STATES = "optimizer states"


def dtype_name(dtype: Any) -> str:
    """``torch.float32`` -> ``"fp32"`` (the names the settings use), else torch's own name."""
    import torch

    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}
    return names.get(dtype, str(dtype).replace("torch.", ""))


def weights_label(trained: bool, dtype: Any) -> str:
    return f"weights, {'trained' if trained else 'frozen'} ({dtype_name(dtype)})"


class _Entry:
    __slots__ = ("label", "nbytes", "ref")

    def __init__(self, ref: Any, nbytes: int, label: str):
        self.ref, self.nbytes, self.label = ref, nbytes, label


class MemoryTracker(TorchDispatchMode):
    """Counts the bytes of live storages on ``device_type`` ("cpu", "cuda"; None: any device but meta).

    ``.current`` and ``.peak`` are bytes; ``.breakdown`` maps a label to its bytes at the peak (summing to the
    peak).  Use as a context manager; :meth:`watch` names the modules and optimizers whose tensors are labelled.
    """

    def __init__(self, device_type: str | None = None, block_bytes: int = BLOCK_BYTES):
        super().__init__()
        self.device_type = device_type
        self.block_bytes = block_bytes
        self.current = 0
        self.peak = 0
        self.breakdown: dict[str, int] = {}
        self._live: dict[int, _Entry] = {}
        self._totals: dict[str, int] = {}
        self._pending = False  # a new peak whose breakdown is not taken yet
        self._parameters: list[Any] = []
        self._buffers: list[Any] = []
        self._optimizers: list[Any] = []
        self._fixed: set[int] = set()  # storages registered with a label of their own

    # ------------------------------------------------------------------------------------------- counting

    def watch(self, modules: list[Any] = (), optimizers: list[Any] = ()) -> MemoryTracker:
        """Label the parameters and buffers of ``modules`` (and their ``.grad``) and the states of ``optimizers``."""
        for module in modules:  # listed once: walking a UNet's submodules at every new peak would be slow
            self._parameters += list(module.parameters())
            self._buffers += list(module.buffers())
        self._optimizers += list(optimizers)
        return self

    def register(self, tensors: Any, label: str | None = None) -> None:
        """Count tensors that existed before the tracker was entered (an iterable of tensors).  ``label``: their
        breakdown entry, else worked out like any other storage's."""
        for tensor in tensors:
            key = self._add(tensor)
            if key is not None and label is not None:
                self._relabel(key, label)
                self._fixed.add(key)
        self._take_breakdown_if_pending()

    def _counts(self, tensor: Any) -> bool:
        device = tensor.device.type
        return device != "meta" if self.device_type is None else device == self.device_type

    def _add(self, tensor: Any) -> int | None:
        if not self._counts(tensor):
            return None
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self._live:
            return key
        nbytes = -(-storage.nbytes() // self.block_bytes) * self.block_bytes
        self._live[key] = _Entry(weakref.ref(storage, lambda _ref, key=key: self._free(key)), nbytes, ACTIVATIONS)
        self._totals[ACTIVATIONS] = self._totals.get(ACTIVATIONS, 0) + nbytes
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self._pending = True
        return key

    def _free(self, key: int) -> None:
        self._take_breakdown_if_pending()  # the state at the peak, before anything of it goes
        entry = self._live.pop(key, None)
        if entry is None:
            return
        self._totals[entry.label] -= entry.nbytes
        self.current -= entry.nbytes
        self._fixed.discard(key)

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        import torch
        from torch.utils._pytree import tree_leaves

        self._take_breakdown_if_pending()  # autograd has stored the last op's gradient by now
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        return out

    def __exit__(self, *exc: Any) -> Any:
        self._take_breakdown_if_pending()
        return super().__exit__(*exc)

    # ------------------------------------------------------------------------------------------- labels

    def _relabel(self, key: int, label: str) -> None:
        entry = self._live.get(key)
        if entry is None or entry.label == label or key in self._fixed:
            return
        self._totals[entry.label] -= entry.nbytes
        self._totals[label] = self._totals.get(label, 0) + entry.nbytes
        entry.label = label

    def _label_watched(self) -> None:
        import torch

        for parameter in self._parameters:
            self._relabel(id(parameter.untyped_storage()), weights_label(parameter.requires_grad, parameter.dtype))
            if parameter.grad is not None:
                self._relabel(id(parameter.grad.untyped_storage()), GRADIENTS)
        for buffer in self._buffers:
            self._relabel(id(buffer.untyped_storage()), weights_label(False, buffer.dtype))
        for optimizer in self._optimizers:
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        self._relabel(id(value.untyped_storage()), OPTIMIZER_STATES)

    def _take_breakdown_if_pending(self) -> None:
        if not self._pending:
            return
        self._pending = False
        self._label_watched()
        self.breakdown = {label: n for label, n in self._totals.items() if n}
