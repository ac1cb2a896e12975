"""The bucketed gradient exchange of several processes (train/distributed.py): the same sums as one flat buffer, with
at most one bucket of extra memory.

The other processes are stood in for by a fake ``all_reduce`` that maps each element on its own (x -> 3x + 1, as
if two more processes had sent 2x + 1): an element reduced twice, missed, or copied back to the wrong place comes out
different.  The real collective is covered by the multi-process runs in tests/test_distributed.py.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from dreambooth.train import distributed


def fake_all_reduce(tensor, op=None, **kwargs):
    tensor.mul_(3).add_(1)


def flat_sum(parameters):
    """The exchange as it was before buckets: every gradient in one flat buffer, cloned back."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for parameter, grad in zip(parameters, grads):
        parameter.grad = flat[offset : offset + grad.numel()].view_as(grad).clone()
        offset += grad.numel()


class NewStorageBytes(TorchDispatchMode):
    """Live bytes of the storages created inside the mode (freed ones leave the count), and their peak."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = id(storage)
                if key not in self.live and key not in inputs:  # in-place ops and views return existing storage
                    self.live[key] = storage.nbytes()
                    weakref.finalize(storage, self.live.pop, key, None)
                self.peak = max(self.peak, sum(self.live.values()))
        return out


def model_parameters(seed: int = 0) -> list[torch.nn.Parameter]:
    """Gradients of mixed sizes in fp32: small ones, one of 40 KB (over a 4 KB bucket), and one missing (None)."""
    generator = torch.Generator().manual_seed(seed)
    shapes = [(7,), (30, 10), (100, 100), (3, 3, 4, 4), (64,), (200,), (5, 5)]
    parameters = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    for index, parameter in enumerate(parameters):
        if index != 4:  # parameter 4 took no part in this process's backward pass
            parameter.grad = torch.randn(parameter.shape, generator=generator)
    return parameters


@pytest.fixture
def small_buckets(monkeypatch):
    monkeypatch.setattr(distributed, "BUCKET_BYTES", 4096)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)


def test_buckets_hold_at_most_bucket_bytes_in_order_and_a_large_gradient_alone(small_buckets):
    parameters = model_parameters()
    buckets = list(distributed.gradient_buckets(parameters, distributed.BUCKET_BYTES))
    assert [p for bucket in buckets for p in bucket] == parameters  # each once, in order
    for bucket in buckets:
        nbytes = sum(p.numel() * p.element_size() for p in bucket)
        assert nbytes <= 4096 or len(bucket) == 1
    assert [parameters[2]] in buckets  # 40 000 bytes: a bucket of its own
    assert len(buckets) < len(parameters)  # small ones share buckets


def test_bucketed_sum_equals_the_flat_sum_for_mixed_sizes_and_a_missing_gradient(small_buckets):
    bucketed, flat = model_parameters(), model_parameters()
    distributed.sum_gradients(bucketed)
    flat_sum(flat)
    for a, b in zip(bucketed, flat):
        assert a.grad is not None and torch.equal(a.grad, b.grad)
    assert torch.equal(bucketed[4].grad, torch.ones(64))  # the missing gradient counted as zeros: 3 * 0 + 1


def test_bucketed_sum_is_in_place_and_adds_at_most_one_bucket_of_memory(small_buckets):
    parameters = model_parameters()
    before = {index: p.grad for index, p in enumerate(parameters) if p.grad is not None}
    with NewStorageBytes() as tracked:
        distributed.sum_gradients(parameters)
    assert all(parameters[i].grad is grad for i, grad in before.items())  # the same tensors, summed in place
    missing = parameters[4].numel() * 4  # the zeros that become the missing gradient
    assert tracked.peak <= 4096 + missing

    gradient_bytes = sum(p.numel() * 4 for p in parameters)
    parameters = model_parameters()
    with NewStorageBytes() as tracked:
        flat_sum(parameters)
    assert tracked.peak >= 2 * (gradient_bytes - missing)  # what the flat buffer cost: a second copy of everything


def test_the_bucket_size_is_ddps_default():
    assert distributed.BUCKET_BYTES == 25 * 2**20
