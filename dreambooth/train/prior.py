"""Prior preservation from the base model (``prior_from_base_model``): no class images.

For each instance sample the step adds one prior sample: the instance's noisy latent (the same latent sample, noise
and timestep) with the concept's *class* prompt.  Its target is not the noise (or v) but what the frozen base model
predicts for that input, so the trained model is asked to keep answering the class prompt as the base model does
(the idea of OneTrainer's prior-prediction concepts and ai-toolkit's differential output preservation).  Its loss is
weighed like a class image's: ``instance + prior_loss_weight x prior`` (train/loss.py).

The class prompt of an instance image is the concept's ``class_prompt`` with the image's caption, rendered as a user's
own class image would be (``[filewords]``, ``caption_template``).  The base model's text embeddings of these prompts
are made once, before anything trains (a trained text encoder or its adapters do not change them).  The base UNet:

- LoRA / LoHa / LoKr: the frozen UNet with the adapter taken off for that forward pass (:meth:`Network.restore`,
  then :meth:`Network.apply` again): one more forward pass per step, no more weights.
- full fine-tune: a copy of the base UNet made before the first step, in half precision (the run's mixed-precision
  dtype; with mixed precision off fp16 on a GPU, bf16 on the CPU), run under autocast in that dtype.  The memory
  estimate counts it (memory/dryrun.py: the trainer's resident tensors).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data.captions import image_caption, render_prompt


def base_prior_problems(settings: Any) -> list[str]:
    """What prior_from_base_model cannot work with, as sentences."""
    if not settings.prior_from_base_model:
        return []
    problems = []
    if settings.with_prior_preservation:
        problems.append(
            "prior_from_base_model and with_prior_preservation are two kinds of prior preservation (the base "
            "model's predictions, or class images): turn one of them off"
        )
    for index, concept in enumerate(settings.concepts, start=1):
        if not concept.class_prompt.strip():
            problems.append(
                f"concept {index}: prior_from_base_model needs a class_prompt (e.g. 'photo of a dog'): the base "
                "model's prediction for it is the prior"
            )
    return problems


def base_copy_dtype(settings: Any, device_type: str) -> Any:
    """The dtype of a full fine-tune's copy of the base UNet: the mixed-precision dtype, else fp16 on a GPU and bf16
    on the CPU (whose fp16 convolutions older torch releases lack)."""
    import torch

    from .precision import frozen_dtype

    dtype = frozen_dtype(settings, device_type)
    if dtype != torch.float32:
        return dtype
    return torch.bfloat16 if device_type == "cpu" else torch.float16


class BasePrior:
    """The base model's predictions of one run (``trainer``: the :class:`~dreambooth.train.loop.Trainer`)."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.prompts: dict[Path, str] = {}  # instance image -> its class prompt
        self.embeddings: dict[str, Any] = {}  # class prompt -> the base text encoder's hidden states (fp32)
        self.unet: Any = None  # full fine-tune: the base UNet's half-precision copy
        self.dtype: Any = None  # its dtype

    def prepare(self, instances: list[list[Any]], device: Any) -> None:
        """Before anything trains: each instance image's class prompt, the base embeddings of those prompts and,
        for a full fine-tune, the copy of the base UNet."""
        import torch

        from ..data.dataset import caption_source
        from .families import Conditioning
        from .precision import half_copy

        trainer = self.trainer
        s, components = trainer.settings, trainer.components
        source = caption_source(s)
        for group in instances:
            for example in group:
                class_prompt = s.concepts[example.concept].class_prompt if s.concepts else ""  # the estimate's
                caption = image_caption(example.path, source)
                self.prompts[example.path] = render_prompt(class_prompt, caption, s.caption_template)
        unique = list(dict.fromkeys(self.prompts.values()))
        if not trainer._trains_text() and trainer.cache_text:  # the run's own cache: the same embeddings
            trainer._text(unique, train_text=False)
            self.embeddings = {p: Conditioning(trainer.text_cache[p], trainer.pooled_cache.get(p)) for p in unique}
        else:
            with torch.no_grad():
                encoded = trainer.family.encode(components, unique, s.clip_skip).to(dtype=torch.float32)
            self.embeddings = dict(zip(unique, encoded.rows()))
        if not s.trains_network:
            self.dtype = base_copy_dtype(s, device.type)
            self.unet = half_copy(components.unet, device, self.dtype).requires_grad_(False).eval()

    def class_prompt(self, example: Any) -> str:
        return self.prompts[example.path]

    def resident_tensors(self) -> list[Any]:
        """What this keeps on the training device for the whole run (for the memory estimate): the UNet copy and
        the embeddings that are not in the trainer's text cache."""
        cached = {id(t) for t in [*self.trainer.text_cache.values(), *self.trainer.pooled_cache.values()]}
        rows = [t for row in self.embeddings.values() for t in (row.hidden, row.pooled) if t is not None]
        tensors = [t for t in rows if id(t) not in cached]
        if self.unet is not None:
            tensors += list(self.unet.parameters()) + list(self.unet.buffers())
        return tensors

    @contextlib.contextmanager
    def _base_unet(self, autocast: Any) -> Iterator[Any]:
        """The base model's UNet and the autocast it runs under."""
        import torch

        if self.unet is not None:
            device = next(self.unet.parameters()).device
            with torch.autocast(device.type, dtype=self.dtype):
                yield self.unet
            return
        network = self.trainer.method.network
        network.restore()  # the adapter off every layer: the frozen base model as it was given
        try:
            with autocast:
                yield self.trainer.components.unet
        finally:
            network.apply()

    def predict(
        self, noisy: Any, timesteps: Any, prompts: list[str], autocast: Any, crops: list[Any] | None = None
    ) -> Any:
        """The base model's prediction (fp32, no gradient) for ``noisy`` latents at ``timesteps`` with the base
        embeddings of ``prompts`` (class prompts); ``autocast``: the run's, for the adapter's frozen UNet;
        ``crops``: the samples' crops (SDXL's time ids)."""
        import torch

        from .families import Conditioning

        conditioning = Conditioning.stack([self.embeddings[p] for p in prompts]).to(noisy.device)
        inputs = self.trainer.family.unet_inputs(conditioning, crops)
        with torch.no_grad(), self._base_unet(autocast) as unet:
            return unet(noisy, timesteps, **inputs).sample.float()

    def targets(
        self,
        target: Any,
        is_base: list[bool],
        noisy: Any,
        timesteps: Any,
        prompts: list[str],
        autocast: Any,
        crops: list[Any] | None = None,
    ) -> Any:
        """``target`` with the rows marked in ``is_base`` replaced by the base model's prediction for them."""
        import torch

        rows = [i for i, flag in enumerate(is_base) if flag]
        if not rows:
            return target
        where = torch.tensor(rows, device=target.device)
        row_crops = [crops[i] for i in rows] if crops else None
        base = self.predict(noisy[where], timesteps[where], [prompts[i] for i in rows], autocast, row_crops)
        return target.index_put((where,), base.to(target.dtype))
