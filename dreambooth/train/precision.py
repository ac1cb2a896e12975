"""The frozen modules of a run (the VAE, a text encoder that is not trained): their dtype and where they are.

Decision (:func:`frozen_placement`, the one place it is made; the trainer and the memory estimate both call it):

- **dtype**: with mixed precision fp16 or bf16 they work in that dtype for the whole run (half their weights'
  memory, faster): they fill the caches, make the class images and samples, and run in every step when their outputs
  are not cached (``cache_latents`` off; the masked-image latents of inpainting models).  The VAE takes fp16 too: the
  SD 1.x / 2.x VAE *encoder* stays in fp16's range at training resolutions; decoding a sample in fp16 that overflows
  is done again in fp32 (train/sampling.py), as the WebUI does.  The SDXL VAE overflows in fp16 (its encoder too):
  an SDXL run keeps its own VAE in fp32 (``vae_in_fp32``), a separate VAE given by the user (e.g. the fp16-fixed
  one) takes the run's dtype.  SDXL's second text encoder is placed like the first.  Cached
  latents and embeddings are stored in fp32.
- **exact weights**: the modules given to the trainer keep their fp32 weights, untouched, in CPU memory; the run
  works with half-precision copies (:class:`FrozenModules`).  Checkpoints are written from the fp32 modules, and at the
  end of the run (or a failure) they are back in the components, on the training device: the checkpoint's VAE and
  text encoder are bit for bit the base model's, and the WebUI gets its modules back unchanged.
- **place during the steps**: a module whose outputs are all cached is not needed by the steps and waits on the CPU
  (the VAE with ``cache_latents`` on, except for inpainting models, which encode the masked image each step; a frozen
  text encoder with cached embeddings), whatever the precision; it comes back to the training device for samples and
  tests (train/sampling.py moves it there and back).
- **the CPU**: bf16 applies on the CPU too, so the CPU runs the very code path a GPU does (the tests and the CPU proof
  of the memory estimate measure it); there it costs memory instead of saving it (the fp32 modules and their bf16
  copies share one memory: 1.5x the frozen modules' fp32 size), which matters little for the tiny models the CPU
  trains.  fp16 does not: fp16 convolutions on the CPU work in the torch we test with but are missing from older
  releases ("not implemented for 'Half'"), and validation refuses fp16 on the CPU anyway; the frozen modules then
  stay fp32.

``low_memory`` no longer changes any of this (it turns gradient checkpointing on).

With a LoRA / LoHa / LoKr ``training_method`` the UNet is frozen too (only the adapter trains, in fp32): it is
placed like the others, on the training device in the mixed-precision dtype, and so is the text encoder (on the
device when its adapters train or its embeddings are not cached).  Nothing saves the base weights then, but the
modules given to the trainer are still given back unchanged: a module already in the run's dtype is used as it is
(the WebUI's half-precision model: no copy at all), another is worked on as a half-precision copy.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from typing import Any, NamedTuple

FROZEN = ("vae", "text_encoder")


class Placement(NamedTuple):
    """A module's place during the training steps (a ``torch.device``) and its dtype for the run."""

    device: Any
    dtype: Any


def frozen_dtype(settings: Any, device_type: str) -> Any:
    """The dtype the frozen modules work in: the mixed-precision dtype (bf16 anywhere, fp16 on a GPU), else fp32."""
    import torch

    if settings.mixed_precision == "bf16" or (settings.mixed_precision == "fp16" and device_type != "cpu"):
        return {"fp16": torch.float16, "bf16": torch.bfloat16}[settings.mixed_precision]
    return torch.float32


def frozen_placement(
    settings: Any,
    device: Any,
    *,
    inpainting: bool = False,
    cache_text: bool = True,
    text_encoders: tuple[str, ...] = ("text_encoder",),
    vae_in_fp32: bool = False,
) -> dict[str, Placement]:
    """``{"vae": Placement, "text_encoder": Placement}`` for a run of ``settings`` on ``device`` (see the module's
    docstring).  A trained text encoder: the training device, fp32 (it is not frozen; it stays fp32 after
    ``stop_text_encoder`` too).  ``inpainting``: the model encodes masked images every step (its VAE stays);
    ``cache_text`` False: the text embeddings are not cached (the benchmark's naive mode).  The fp32 weights kept
    for saving are in CPU memory in every case.  ``text_encoders``: the model's (SDXL: "text_encoder",
    "text_encoder_2"), placed alike; ``vae_in_fp32``: the VAE stays fp32 whatever the precision (SDXL's own)."""
    import torch

    device = torch.device(device)
    cpu = torch.device("cpu")
    dtype = frozen_dtype(settings, device.type)
    vae_cached = settings.cache_latents and not inpainting
    placement = {"vae": Placement(cpu if vae_cached else device, torch.float32 if vae_in_fp32 else dtype)}
    if settings.trains_network:  # the adapter trains; the UNet and the text encoder stay frozen
        placement["unet"] = Placement(device, dtype)
        text_needed = settings.network_train_text_encoder or not cache_text
        text = Placement(device if text_needed else cpu, dtype)
    elif settings.train_text_encoder:
        text = Placement(device, torch.float32)
    else:
        text = Placement(cpu if cache_text else device, dtype)
    placement.update((name, text) for name in text_encoders)
    return placement


def _floating_dtype(module: Any) -> Any:
    """The dtype of a module's floating-point parameters when they all share one, else None."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else None


def half_copy(module: Any, device: Any, dtype: Any) -> Any:
    """A copy of ``module`` on ``device`` with its floating-point tensors in ``dtype``, made without a second
    full-precision copy (each tensor is converted on its own)."""
    import torch

    memo: dict[int, Any] = {}
    for tensor in itertools.chain(module.parameters(), module.buffers()):
        converted = tensor.detach().to(device, dtype if tensor.is_floating_point() else None, copy=True)
        if isinstance(tensor, torch.nn.Parameter):
            converted = torch.nn.Parameter(converted, requires_grad=tensor.requires_grad)
        memo[id(tensor)] = converted
    return copy.deepcopy(module, memo)


def move(module: Any, device: Any, dtype: Any) -> None:
    """``module`` to ``device`` and ``dtype``, converting only what differs (diffusers warns at every dtype cast)."""
    import torch

    current = next(module.parameters())
    if current.dtype != dtype:
        module.to(dtype=dtype)
    if current.device != torch.device(device):
        module.to(device=device)


class FrozenModules:
    """The components' frozen modules placed for a run: half-precision copies where the placement says so, the
    given fp32 modules kept on the CPU, untouched, for saving and for the end of the run."""

    def __init__(self, components: Any, placement: dict[str, Placement], device: Any):
        """Puts every frozen module on ``device`` in its run dtype (the placement's steps device comes later:
        :meth:`park`)."""
        import torch

        self.placement = placement
        self.originals: dict[str, Any] = {}  # name -> the fp32 module given to the trainer, on the CPU
        self.given_dtypes: dict[str, Any] = {}  # name -> the dtype of a given module converted in place
        try:
            for name, (_, dtype) in placement.items():
                module = getattr(components, name)
                given = _floating_dtype(module)
                if dtype == torch.float32 or given == dtype:  # nothing to convert (or up to fp32): used in place
                    if given is not None and given != dtype:
                        self.given_dtypes[name] = given  # a half-precision model given: back in its dtype at the end
                    move(module, device, dtype)
                    continue
                move(module, "cpu", torch.float32)  # fp32 as loaded; off the GPU
                setattr(components, name, half_copy(module, device, dtype))
                self.originals[name] = module
        except BaseException:  # e.g. out of memory: the components keep the modules they were given
            for name, module in self.originals.items():
                setattr(components, name, module)
            raise

    def park(self, components: Any) -> None:
        """Each frozen module to its place during the steps (the CPU when its outputs are cached)."""
        for name, (device, _) in self.placement.items():
            getattr(components, name).to(device)

    def exact(self, components: Any) -> Any:
        """The components with the fp32 modules in place of the half-precision copies (for writing checkpoints)."""
        return dataclasses.replace(components, **self.originals) if self.originals else components

    def restore(self, components: Any, device: Any) -> None:
        """The fp32 modules back in ``components``, on ``device``, a module converted in place back in the dtype it
        was given in (a frozen one's values are exactly those: fp16 / bf16 -> fp32 -> back is exact); the copies
        are dropped."""
        for name in self.placement:
            setattr(components, name, self.originals.get(name, getattr(components, name)))
            module = getattr(components, name)
            if name in self.given_dtypes:
                module.to(self.given_dtypes[name])
            module.to(device)
        self.originals, self.given_dtypes = {}, {}
