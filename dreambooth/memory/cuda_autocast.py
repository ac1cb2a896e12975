"""CUDA's autocast float32 list for the dry run, which runs on fake CPU tensors under the CPU's autocast.

The two autocasts differ in the ops they run in float32.  CUDA's list (torch.amp's documentation, "CUDA Ops that can
autocast to float32") holds ``group_norm`` and ``layer_norm`` (and softmax, exp, pow, the losses...): on a GPU their
outputs are float32 whatever their inputs, while the CPU's autocast runs them in the input's dtype.  In a UNet each
GroupNorm -> SiLU -> convolution then keeps, for the backward pass, a float32 tensor (SiLU's input) and its
half-precision cast (the convolution's input) on a GPU, where the CPU keeps one half-precision tensor.  Measured on
an H200 (SD 1.5, 512 px, bf16 mixed precision, bf16 weights, fused backward, no checkpointing): 2.33 GiB of
activations after the forward pass, against 1.78 GiB estimated with the CPU's lists (docs/benchmarks.md,
"GPU (H200)").

:func:`normalize_in_float32` gives the GroupNorm and LayerNorm modules of the dry run's own (fake) modules CUDA's
behaviour: while an autocast is on, they normalise in float32 (input, weight and bias cast to float32, as CUDA's
autocast casts them).  In a diffusion model these are what the list changes in size: the UNet and the text encoders
attend through scaled-dot-product attention (half precision on both), and the other ops of the list (the timestep
embedding's ``exp``, the loss) act on small tensors.  Each module's ``forward`` is replaced on that instance only
(the dry run's own modules; nothing global), so gradient checkpointing's recomputation during the backward pass sees
it too.
"""

from __future__ import annotations

import functools
from typing import Any


def normalize_in_float32(module: Any) -> None:
    """Every ``torch.nn.GroupNorm`` / ``torch.nn.LayerNorm`` inside ``module`` normalises in float32 while an
    autocast is on, as on a CUDA GPU; otherwise as before."""
    import torch

    for submodule in module.modules():
        if isinstance(submodule, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            submodule.forward = functools.partial(_float32_forward, submodule, submodule.forward)


def _float32_forward(module: Any, forward: Any, input: Any) -> Any:
    import torch
    import torch.nn.functional as F

    if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
        return forward(input)

    def as_float32(tensor: Any) -> Any:
        return tensor if tensor is None or tensor.dtype == torch.float32 else tensor.float()

    weight, bias = as_float32(module.weight), as_float32(module.bias)
    if isinstance(module, torch.nn.GroupNorm):
        return F.group_norm(as_float32(input), module.num_groups, weight, bias, module.eps)
    return F.layer_norm(as_float32(input), module.normalized_shape, weight, bias, module.eps)
