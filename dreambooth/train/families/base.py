"""The interface of a model family (see the package's docstring) and the conditioning it makes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass
class Conditioning:
    """What the UNet is conditioned on for a batch of prompts: the text encoders' hidden states ``hidden`` (batch,
    tokens, features) and, for SDXL, the pooled text embedding ``pooled`` (batch, features)."""

    hidden: Any
    pooled: Any = None

    def to(self, device: Any = None, dtype: Any = None) -> Conditioning:
        options = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        pooled = None if self.pooled is None else self.pooled.to(**options)
        return Conditioning(self.hidden.to(**options), pooled)

    def rows(self) -> list[Conditioning]:
        """One conditioning per prompt (for the cache of a frozen encoder)."""
        pooled = [None] * len(self.hidden) if self.pooled is None else list(self.pooled)
        return [Conditioning(h, p) for h, p in zip(self.hidden, pooled)]

    @staticmethod
    def stack(rows: list[Conditioning]) -> Conditioning:
        import torch

        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return Conditioning(torch.stack([r.hidden for r in rows]), pooled)


class Family:
    """One model family's training and sampling behaviour.  Subclasses: ``sd.py``, ``sdxl.py``."""

    name: ClassVar[str] = ""
    default_resolution: ClassVar[int] = 512  # px: what a run trains at when the settings leave resolution empty
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)  # the Components attributes
    uses_crops: ClassVar[bool] = False  # the UNet is told each sample's crop (SDXL's time ids)
    vae_in_fp32: ClassVar[bool] = False  # its own VAE overflows in half precision

    def text_encoders(self, components: Any) -> list[Any]:
        return [getattr(components, name) for name in self.text_encoder_names]

    def check(self, components: Any, clip_skip: int) -> str | None:
        """Why ``clip_skip`` cannot be used with this model, or None."""
        raise NotImplementedError

    def encode(self, components: Any, prompts: list[str], clip_skip: int) -> Conditioning:
        """The conditioning of ``prompts`` (on the text encoders' device; gradients flow when they train)."""
        raise NotImplementedError

    def unet_inputs(self, conditioning: Conditioning, crops: list[Any] | None = None) -> dict[str, Any]:
        """Keyword arguments of the UNet's forward for ``conditioning`` (on the UNet's device) and each sample's
        :class:`~dreambooth.data.images.Crop` (families with ``uses_crops``)."""
        return {"encoder_hidden_states": conditioning.hidden}

    def pipeline(self, components: Any, scheduler: Any) -> Any:
        """A diffusers text-to-image pipeline around the modules in memory (nothing is read from disk)."""
        raise NotImplementedError

    def pipeline_inputs(
        self, pipe: Any, components: Any, prompts: list[str], negative: list[str], clip_skip: int, dtype: Any
    ) -> dict[str, Any]:
        """The pipeline's prompt arguments for a batch (``dtype``: the UNet's)."""
        raise NotImplementedError
