"""Live tensor bytes, counted per storage, and what they were at the peak.

:class:`MemoryTracker` is a ``TorchDispatchMode``: every tensor an operator returns is looked at, and its *storage*
(not the tensor: a view shares its base's memory) is counted once, with a ``weakref`` whose callback subtracts it
when the storage is freed.  This works for real tensors and for ``FakeTensorMode``'s fake ones alike, which is what
lets the memory estimate (``memory/dryrun.py``) and a real CPU run be measured by the same code.  Tensors that
existed before the tracker was entered (module weights, cached text embeddings) are added with :meth:`register`.

Sizes are rounded up to the CUDA caching allocator's block of 512 bytes, as ``torch.cuda.max_memory_allocated``
counts them.  What allocations inside an operator do (workspaces) and what the allocator keeps cached are not seen:
:mod:`.estimate` adds them as constants.

The breakdown at the peak: at the first free after a new peak (nothing was allocated or freed since the peak) the
tracker keeps the list of live storages, a cheap copy.  Labels -- weights (trained or frozen, by dtype), gradients,
optimizer states, activations and temporaries -- are set on the storages themselves, so a storage labelled later is
labelled in the kept list too: a gradient as it reaches its parameter (autograd hooks), weights and optimizer states
when the tracker is left (they live from before the peak to the end).  Everything else is an activation or a
temporary.
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
    __slots__ = ("fixed", "label", "nbytes", "ref")

    def __init__(self, ref: Any, nbytes: int):
        self.ref, self.nbytes, self.label, self.fixed = ref, nbytes, ACTIVATIONS, False


class MemoryTracker(TorchDispatchMode):
    """Counts the bytes of live storages on ``device_type`` ("cpu", "cuda"; None: any device but meta).

    ``.current`` and ``.peak`` are bytes; ``.breakdown`` (filled when the tracker is left) maps a label to its bytes
    at the peak, summing to the peak.  Use as a context manager; :meth:`watch` names the modules and optimizers
    whose tensors are labelled.
    """

    def __init__(self, device_type: str | None = None, block_bytes: int = BLOCK_BYTES):
        super().__init__()
        self.device_type = device_type
        self.block_bytes = block_bytes
        self.current = 0
        self.peak = 0
        self.breakdown: dict[str, int] = {}
        self._live: dict[int, _Entry] = {}
        self._at_peak: list[_Entry] = []  # the live storages at the peak; their labels may be set later
        self._pending = False  # a new peak not yet copied into _at_peak
        self._parameters: list[Any] = []
        self._buffers: list[Any] = []
        self._optimizers: list[Any] = []
        self._hooks: list[Any] = []

    # ------------------------------------------------------------------------------------------- counting

    def watch(self, modules: list[Any] = (), optimizers: list[Any] = ()) -> MemoryTracker:
        """Label the parameters and buffers of ``modules`` (and their gradients) and the states of ``optimizers``."""
        for module in modules:  # listed once: walking a UNet's submodules again would be slow
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
                entry = self._live[key]
                entry.label, entry.fixed = label, True

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
        self._live[key] = _Entry(weakref.ref(storage, lambda _ref, key=key: self._free(key)), nbytes)
        self.current += nbytes
        if self.current > self.peak:
            self.peak = self.current
            self._pending = True
        return key

    def _free(self, key: int) -> None:
        if self._pending:  # the first free after a new peak: until now nothing came or went since the peak
            self._at_peak = list(self._live.values())
            self._pending = False
        entry = self._live.pop(key, None)
        if entry is not None:
            self.current -= entry.nbytes

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        import torch
        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self._add(leaf)
        return out

    def __enter__(self) -> MemoryTracker:
        # A gradient is labelled as it reaches its parameter (before a fused optimizer step may free it) and once
        # it is stored in .grad (when autograd stored a copy of it).
        for parameter in self._parameters:
            if parameter.requires_grad:
                self._hooks.append(parameter.register_hook(self._label_gradient))
                self._hooks.append(parameter.register_post_accumulate_grad_hook(self._label_stored_gradient))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> Any:
        result = super().__exit__(*exc)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        if self._pending:
            self._at_peak = list(self._live.values())
            self._pending = False
        self._label_watched()
        breakdown: dict[str, int] = {}
        for entry in self._at_peak:
            breakdown[entry.label] = breakdown.get(entry.label, 0) + entry.nbytes
        self.breakdown = dict(sorted(breakdown.items(), key=lambda item: -item[1]))
        return result

    # ------------------------------------------------------------------------------------------- labels

    def _label(self, tensor: Any, label: str) -> None:
        entry = self._live.get(id(tensor.untyped_storage()))
        if entry is not None and not entry.fixed:
            entry.label = label

    def _label_gradient(self, gradient: Any) -> None:
        self._label(gradient, GRADIENTS)

    def _label_stored_gradient(self, parameter: Any) -> None:
        if parameter.grad is not None:
            self._label(parameter.grad, GRADIENTS)

    def _label_watched(self) -> None:
        """Weights and optimizer states live from before the peak to the end: they are labelled once, at the end."""
        import torch

        for parameter in self._parameters:
            self._label(parameter, weights_label(parameter.requires_grad, parameter.dtype))
            if parameter.grad is not None:
                self._label(parameter.grad, GRADIENTS)
        for buffer in self._buffers:
            self._label(buffer, weights_label(False, buffer.dtype))
        for optimizer in self._optimizers:
            for state in optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        self._label(value, OPTIMIZER_STATES)
