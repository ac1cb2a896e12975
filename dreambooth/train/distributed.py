"""Data-parallel training across processes started by ``torchrun`` or ``accelerate launch``.

One process (no ``WORLD_SIZE`` in the environment, as in the WebUI) uses none of this: :class:`Single`.  Under a
launcher, accelerate's ``Accelerator`` sets up the process group (gloo on the CPU, NCCL on GPUs) and the device of
each process; its state is created only here, in a process started for training, so nothing leaks into the WebUI.

The math does not depend on the process count: the global batch of a step is the same samples whatever the number of
processes (each takes its slice), each process divides its per-sample loss sums by the *global* counts, and the
gradients are summed across processes after the last micro-batch.  So N processes x batch b and one process x batch
N*b compute the same gradient, up to the order of floating-point additions.

The gradient exchange (:func:`sum_gradients`) sums in place, bucketed as DDP does: up to :data:`BUCKET_BYTES` of
gradients are flattened into one buffer, all-reduced and copied back, so the memory it adds is one bucket, not a
second copy of every gradient; a gradient larger than a bucket is all-reduced where it lies.  Not DDP itself: DDP
needs every process to run the same forward and backward passes, and here a process may have no sample in a
micro-batch (the global batch is sliced), a micro-batch runs one forward pass per latent shape, and the text encoder
stops training part-way; summing once after the last micro-batch keeps the math identical in all those cases.  The
price is no overlap of the exchange with the backward pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

BUCKET_BYTES = 25 * 2**20  # gradients flattened per all-reduce at most (DDP's default bucket size)


class Single:
    """The one-process case: every collective is a no-op."""

    rank = 0
    world_size = 1
    is_main = True

    def __init__(self, device: Any):
        self.device = device

    def barrier(self) -> None: ...

    def sum_gradients(self, parameters: list[Any]) -> None: ...

    def sum_values(self, values: list[float]) -> list[float]:
        return list(values)

    def broadcast_flags(self, flags: list[bool]) -> list[bool]:
        return list(flags)


class Distributed(Single):
    """Several processes: collectives through the process group accelerate initialised."""

    def __init__(self, cpu: bool):
        from accelerate import Accelerator

        self.accelerator = Accelerator(cpu=cpu)
        self.rank = self.accelerator.process_index
        self.world_size = self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        super().__init__(self.accelerator.device)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def sum_gradients(self, parameters: list[Any]) -> None:
        sum_gradients(parameters)

    def sum_values(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def broadcast_flags(self, flags: list[bool]) -> list[bool]:
        """The main process's flags (cancel / save now / sample now) on every process, so all act together."""
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([int(f) for f in flags], dtype=torch.int64, device=self.device)
        dist.broadcast(tensor, src=0)
        return [bool(v) for v in tensor.tolist()]


def sum_gradients(parameters: list[Any]) -> None:
    """Sum the gradients of ``parameters`` over the processes in place, one bucket at a time (see the module's
    docstring); a missing gradient counts as zeros and becomes a gradient of zeros summed with the others'."""
    import torch
    import torch.distributed as dist

    for bucket in gradient_buckets(parameters, BUCKET_BYTES):
        for parameter in bucket:
            if parameter.grad is None:  # this process did not use it; the others may have
                parameter.grad = torch.zeros_like(parameter)
        grads = [p.grad for p in bucket]
        if len(grads) == 1 and grads[0].is_contiguous():
            dist.all_reduce(grads[0], op=dist.ReduceOp.SUM)
            continue
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
            offset += grad.numel()
        del flat


def gradient_buckets(parameters: list[Any], bucket_bytes: int) -> Iterator[list[Any]]:
    """``parameters`` in order, in runs of one dtype and device of at most ``bucket_bytes`` bytes of gradient each;
    a parameter larger than that is a bucket of its own."""
    bucket: list[Any] = []
    size = 0
    for parameter in parameters:
        nbytes = parameter.numel() * parameter.element_size()
        same_kind = not bucket or (parameter.dtype, parameter.device) == (bucket[0].dtype, bucket[0].device)
        if bucket and (not same_kind or size + nbytes > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append(parameter)
        size += nbytes
    if bucket:
        yield bucket


def launched_processes() -> int:
    """How many processes a launcher started for this run (1 when none)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def make(device_name: str, single_device: Any) -> Single:
    """:class:`Distributed` under a launcher with several processes, else :class:`Single` on ``single_device``."""
    if launched_processes() <= 1:
        return Single(single_device)
    import torch

    return Distributed(cpu=device_name == "cpu" or not torch.cuda.is_available())
