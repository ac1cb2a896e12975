"""Model families: what SD 1.x / 2.x and SDXL do differently in training and sampling, one module each behind
:class:`~dreambooth.train.families.base.Family` (DESIGN.md §3: a new family is a new file here, not ``if``
branches across the loop).

A family says which text encoders the model has and how a batch of prompts becomes the UNet's conditioning
(:meth:`Family.encode`, :meth:`Family.unet_inputs`), which diffusers pipeline makes images with the modules in memory,
its default training resolution, and whether its VAE must stay in fp32.
"""

from __future__ import annotations

from typing import Any

from .base import Conditioning, Family

__all__ = ["Conditioning", "Family", "family_for"]


def family_for(model: Any) -> Family:
    """The family of ``model``: a :class:`~dreambooth.models.components.Components` or an
    :class:`~dreambooth.models.architecture.Architecture`."""
    arch = getattr(model, "arch", model)
    if arch.is_sdxl:
        from .sdxl import SDXL

        return SDXL()
    from .sd import StableDiffusion

    return StableDiffusion()
