"""The dry run behind the memory estimate: the trainer's own code, on fake tensors, for two optimizer steps.

:class:`DryRun` is a :class:`~dreambooth.train.loop.Trainer` that overrides only what produces data: the examples
(one batch of the configuration's concepts: instance images, and their class images with prior preservation, all
of the largest bucket with aspect-ratio buckets), the latent cache (latent distributions of that shape), the pixels
(when latents are not cached or the model is inpainting) and their crops (SDXL's time ids), a tokenizer stand-in
(ids of the encoder's length) and the loss as numbers.  Loading, placement (``_load``, ``_cache``), the caches of
text embeddings, the optimizer, schedule and GradScaler (``_optimization``), the step (``_step``, ``_loss``:
prior-preservation batch, autocast, gradient checkpointing, the text encoder trained or frozen and cached, clipping,
the optimizer step) are the trainer's.  Two steps run, since the optimizer creates its states in the first and the
steady-state peak is the second's.  :func:`tracked_steps` is the part a real run shares (the CPU agreement test wraps
a real run with it).

The modules are built on the meta device (no weights are read or initialised) and moved into
``FakeTensorMode``'s fake tensors of the *CPU*: this torch has no CUDA, and fake CUDA tensors fail inside the UNet.
So the operators run with the CPU's choices: the CPU's attention kernel and autocast's CPU op lists, except that for
a CUDA GPU GroupNorm and LayerNorm normalise in float32 under autocast, as CUDA's autocast has them and the CPU's
does not (:mod:`.cuda_autocast`: 30% more activations in half precision, measured on an H200).  For a
CUDA GPU that means the same weights, gradients and optimizer states to the byte, activations as the CPU kernels
keep them with CUDA's float32 normalisation (its flash attention keeps less at high resolutions than the CPU's), and
nothing of what a kernel allocates inside (cuBLAS / cuDNN workspaces): the
estimate adds those as a constant (:mod:`.estimate`).  What is placed where, in which dtype (the VAE or a frozen text
encoder off the GPU when their outputs are cached; in the mixed-precision dtype) is decided by the trainer's own
``frozen_placement`` for ``device_type`` ("cuda" unless told otherwise).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

from ..settings import Concept, Settings
from ..train.loop import Trainer
from .cuda_autocast import normalize_in_float32
from .tracker import MemoryTracker

DRY_RUN_STEPS = 2
READS_NUMBERS = frozenset({"prodigy"})  # optimizers whose step reads numbers from tensors (see _numbers_as_one)
TEXT_CACHE_LABEL = "cached text embeddings"


def tracked_steps(trainer: Trainer, run: Any, steps: int, device_type: str, off_device: set[str] = frozenset()) -> Any:
    """Run ``steps`` of ``trainer._step`` inside a :class:`MemoryTracker` that counts what is on the training
    device: the modules' weights (but those named in ``off_device``: "vae", "text_encoder"), the cached text
    embeddings and all that the steps allocate.  The latent cache is in CPU memory on a GPU and is not counted."""
    components = trainer.components
    names = ("unet", "text_encoder", "text_encoder_2", "vae")  # SDXL's second text encoder; None for SD 1.x / 2.x
    modules = [getattr(components, n) for n in names if n not in off_device and getattr(components, n) is not None]
    if trainer.method is not None:  # a LoRA / LoHa / LoKr adapter: its weights beside the frozen model's
        modules.append(trainer.method.network)
    tracker = MemoryTracker(device_type).watch(modules, [run.optimizer])
    for module in modules:
        tracker.register(list(module.parameters()) + list(module.buffers()))
    cached = [*trainer.text_cache.values(), *trainer.pooled_cache.values()]  # SDXL: also the pooled embeddings
    tracker.register(cached, TEXT_CACHE_LABEL)
    for label, tensors in trainer.resident_tensors().items():  # the EMA, the base model kept for the prior
        tracker.register(tensors, label)
    with tracker:
        for _ in range(steps):
            trainer._step(run)
    return tracker


class TrackedTrainer(Trainer):
    """The real trainer, its steps run inside the tracker the dry run uses (:func:`tracked_steps`, on the training
    device: on the CPU nothing is moved off it); after :meth:`run`, ``.tracker`` holds the peak and its breakdown.
    What the CPU agreement test compares with the estimate; the benchmark's *tracked* column.  The tracker slows
    every operator: time steps in an untracked run."""

    tracker: MemoryTracker | None = None

    def _steps(self, run: Any) -> None:
        self.tracker = tracked_steps(self, run, run.total, run.device.type)


class _TokenizerStandIn:
    """Token ids of the right length (the text encoder's positions), without a vocabulary."""

    def __init__(self, length: int):
        self.model_max_length = length

    def __call__(self, text: Any, return_tensors: str | None = None, **_: Any) -> Any:
        import torch

        texts = [text] if isinstance(text, str) else list(text)
        if return_tensors != "pt":  # the prompt-length warning counts words' tokens: one per word is enough here
            ids: Any = [[0] * len(t.split()) for t in texts]
            return _Ids(ids[0] if isinstance(text, str) else ids)
        return _Ids(torch.zeros((len(texts), self.model_max_length), dtype=torch.long))


@dataclasses.dataclass
class _Ids:
    input_ids: Any


class _LatentCacheStandIn:
    """What the trainer reads from its latent cache, (mean, std) of the example's latent shape, made once per key
    and kept (a real cache holds them in CPU memory)."""

    def __init__(self, latent_channels: int, scale: int, resolution: int):
        self.latent_channels, self.scale, self.resolution = latent_channels, scale, resolution
        self.memory: dict[Any, tuple[Any, Any]] = {}

    def get(self, path: Path, flip: bool, size: tuple[int, int] | None = None, variant: int = 0) -> tuple[Any, Any]:
        import torch

        key = (path, flip, size, variant)
        if key not in self.memory:
            width, height = size or (self.resolution, self.resolution)
            shape = (self.latent_channels, height // self.scale, width // self.scale)
            self.memory[key] = (torch.zeros(shape), torch.ones(shape))
        return self.memory[key]

    def pixels(self, path: Path, flip: bool, size: tuple[int, int] | None = None, variant: int = 0) -> Any:
        import torch

        width, height = size or (self.resolution, self.resolution)
        return torch.zeros((3, height, width))

    def crop(self, path: Path, flip: bool, size: tuple[int, int] | None = None, variant: int = 0) -> Any:
        return _crop_stand_in(size or (self.resolution, self.resolution))


def _crop_stand_in(size: tuple[int, int]) -> Any:
    """The crop of an image of exactly the training ``size`` (width, height): SDXL's time ids are numbers of the same
    shape whatever the crop."""
    from ..data.images import Crop

    width, height = size
    return Crop((height, width), (height, width), 0, 0, (height, width))


class DryRun(Trainer):
    """The trainer on fake tensors of ``arch``; :meth:`measure` returns the tracker of two steps."""

    def __init__(self, settings: Settings, arch: Any, device_type: str = "cuda", cache_text: bool = True):
        """One process's share: with several processes each takes ``train_batch_size`` samples of a step, as here.
        ``cache_text``: the trainer's flag of the same name (False: a frozen text encoder runs every step, as the
        benchmark's naive configuration does)."""
        # Nothing may be read from disk or written: no resume, no separate VAE file (the same structure is assumed),
        # no logger; xformers does not run on the CPU (SDPA stands in for it).
        settings = dataclasses.replace(
            settings,
            resume_from="",
            network_init_from="",
            pretrained_vae_name_or_path="",
            attention="sdpa",
            report_to="none",
            max_train_steps=DRY_RUN_STEPS,
            device="cpu",
            # a quick look without concepts (--arch) estimates one concept of the defaults: the trainer reads each
            # concept's repeats and loss_weight
            concepts=settings.concepts or [Concept()],
        )
        super().__init__(settings, cache_text=cache_text, final_save=False, check_model_path=False)
        self.arch = arch
        self.target_device_type = device_type
        self.off_device: set[str] = set()  # the components the trainer moved off the (estimated) GPU

    # ---------------------------------------------------------------------------------------- placement

    def frozen_placement(self, components: Any, device: Any) -> dict[str, Any]:
        """The trainer's placement for the estimated device; a module placed elsewhere (the CPU) stays a fake CPU
        module here but is no longer counted."""
        import torch

        from ..train.precision import Placement

        placement = super().frozen_placement(components, torch.device(self.target_device_type))
        for name, (where, _) in placement.items():
            if where.type != self.target_device_type:
                self.off_device.add(name)
        return {name: Placement(device, dtype) for name, (_, dtype) in placement.items()}

    def _ema_device(self, device: Any) -> Any:
        """ema_on_cpu: not on the GPU; the meta device keeps its (fake) tensors out of the count."""
        return "meta" if self.settings.ema_on_cpu else device

    # ---------------------------------------------------------------------------------------- data

    def _class_images(self, components: Any) -> None:
        """Class images are files; their number does not change the memory of a step."""

    def _examples(self) -> tuple[list[list[Any]], list[list[Any]] | None]:
        from ..data.dataset import Example

        s = self.settings
        per_concept = max(1, s.train_batch_size)
        instances, classes = [], [] if s.has_prior_preservation else None
        for index, concept in enumerate(s.concepts or [None]):
            instance_prompt = concept.instance_prompt if concept else ""
            instances.append(
                [Example(Path(f"dry-run/{index}/{i}.png"), instance_prompt, index, False) for i in range(per_concept)]
            )
            if classes is not None:
                class_prompt = concept.class_prompt if concept else ""
                classes.append(
                    [Example(Path(f"dry-run/{index}/c{i}.png"), class_prompt, index, True) for i in range(per_concept)]
                )
        if s.use_aspect_ratio_bucket:
            from ..data.buckets import resolve_buckets

            largest = max(resolve_buckets(s), key=lambda b: (b.width * b.height, b.width))
            self.bucket_of = {e.path: largest for group in instances + (classes or []) for e in group}
        return instances, classes

    def _latent_scale(self) -> int:
        return 2 ** (len(self.components.vae.config.block_out_channels) - 1)

    def _new_latent_cache(self) -> Any:
        vae = self.components.vae
        return _LatentCacheStandIn(vae.config.latent_channels, self._latent_scale(), self.settings.resolution)

    def _pixels(self, example: Any, flip: bool, sample_index: int, epoch: int) -> Any:
        import torch

        size = self._size(example)
        width, height = size or (self.settings.resolution, self.settings.resolution)
        return torch.zeros((3, height, width))

    def _crop(self, example: Any, flip: bool, sample_index: int, epoch: int) -> Any:
        if self.latent_cache is not None:
            return self.latent_cache.crop(example.path, flip, self._size(example))
        return _crop_stand_in(self._size(example) or (self.settings.resolution, self.settings.resolution))

    def _loss_values(self, loss: Any, instance_loss: Any, prior_loss: Any) -> list[float]:
        return [0.0, 0.0, 0.0]  # fake tensors hold no numbers

    def _logger(self, out: Path) -> Any:
        return None

    def _optimizer_construction(self) -> Any:
        """Optimizers are built outside the fake-tensor mode: bitsandbytes computes its quantisation maps from real
        numbers when it is built (its update itself runs on fake tensors)."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        return unset_fake_temporarily()

    def _build_network(self, components: Any) -> Any:
        """A LoRA / LoHa / LoKr adapter: built of real tensors (LyCORIS reads some shapes back as numbers, which fake
        tensors cannot give; an adapter is small), then made fake like the model's modules."""
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():
            network = super()._build_network(components)
        _convert_by_replacing(network)
        return network.to_empty(device="cpu")

    # ---------------------------------------------------------------------------------------- the run

    def _fake_components(self) -> Any:
        from ..models.components import (
            Components,
            _on_meta,
            build_scheduler,
            build_text_encoder,
            build_text_encoder_2,
            build_unet,
            build_vae,
        )

        arch = self.arch
        components = Components(
            unet=_on_meta(lambda: build_unet(arch)),
            vae=_on_meta(lambda: build_vae(arch)),
            text_encoder=_on_meta(lambda: build_text_encoder(arch)),
            tokenizer=_TokenizerStandIn(int(arch.text["max_position_embeddings"])),
            noise_scheduler=build_scheduler(arch),
            arch=arch,
        )
        if arch.is_sdxl:  # the second (OpenCLIP bigG) text encoder and its tokenizer
            components.text_encoder_2 = _on_meta(lambda: build_text_encoder_2(arch))
            components.tokenizer_2 = _TokenizerStandIn(int(arch.text_2["max_position_embeddings"]))
        for module in components.modules:
            module.requires_grad_(False).eval()
        return components

    def measure(self) -> MemoryTracker:
        """Set up as the trainer does and track two steps; returns the tracker (bytes, peak breakdown)."""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode

        from ..compat import quiet_library_notices
        from ..train.distributed import Single

        if self.arch.is_inpainting:  # its masks decide per sample whether the VAE runs: data a dry run has not
            from ..errors import DreamBoothError

            raise DreamBoothError(
                "the memory estimate does not cover inpainting models yet (whether the VAE encodes a masked image "
                "depends on each random mask); estimate the same model's non-inpainting version for a lower bound"
            )
        self.dist = Single(torch.device("cpu"))
        with quiet_library_notices():
            components = self._fake_components()  # on meta: built in seconds, nothing initialised
        with FakeTensorMode(allow_non_fake_inputs=True):
            for module in components.modules:
                module.to_empty(device="cpu")
                _convert_by_replacing(module)
                if self.target_device_type == "cuda":  # CUDA's autocast normalises in float32, the CPU's does not
                    normalize_in_float32(module)
            self.components = components
            run = self._setup()
            if self.settings.optimizer in READS_NUMBERS:
                run.optimizer.step = _numbers_as_one(run.optimizer.step)
            if run.scaler is not None:
                run.scaler = _always_stepping(run.scaler)
            tracker = tracked_steps(self, run, DRY_RUN_STEPS, "cpu", self.off_device)
        return tracker


def _convert_by_replacing(module: Any) -> None:
    """Let the trainer's ``module.to(...)`` / ``.bfloat16()`` work on this fake module: torch's ``Module._apply``
    swaps fake parameters in place, which fails (``FakeTensorMode`` keeps a weak reference to them); these modules,
    the dry run's own, get new parameters instead (an attribute of each instance: nothing else changes)."""
    for submodule in module.modules():
        submodule._apply = functools.partial(_replacing_apply, submodule)


def _replacing_apply(module: Any, fn: Any, recurse: bool = True) -> Any:
    import torch

    if recurse:
        for child in module.children():
            child._apply(fn)
    for key, parameter in module._parameters.items():
        if parameter is not None:
            with torch.no_grad():
                converted = fn(parameter)
            if converted is not parameter:
                module._parameters[key] = torch.nn.Parameter(converted, requires_grad=parameter.requires_grad)
    for key, buffer in module._buffers.items():
        if buffer is not None:
            module._buffers[key] = fn(buffer)
    return module


def _numbers_as_one(step: Any) -> Any:
    """The optimizer's ``step``, with every number it reads from a tensor (``.item()``) read as 1: a fake tensor holds
    none, and the memory of a step does not depend on them (Prodigy's step-size estimate is such a number).  Only the
    optimizer's step reads them so: the trainer's own code must stay free of data-dependent branches."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class NumbersAsOne(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func is torch.ops.aten._local_scalar_dense.default:
                dtype = args[0].dtype
                return 1.0 if dtype.is_floating_point else (True if dtype == torch.bool else 1)
            return func(*args, **(kwargs or {}))

    @functools.wraps(step)
    def stepping(*args: Any, **kwargs: Any) -> Any:
        with NumbersAsOne():
            return step(*args, **kwargs)

    return stepping


def _always_stepping(scaler: Any) -> Any:
    """The run's GradScaler, stepping without reading whether gradients overflowed (a fake tensor holds no value;
    a real run steps too, but in the rare overflowing step)."""

    class AlwaysStepping(type(scaler)):
        def _maybe_opt_step(self, optimizer: Any, optimizer_state: Any, *args: Any, **kwargs: Any) -> Any:
            return optimizer.step(*args, **kwargs)

    scaler.__class__ = AlwaysStepping
    return scaler
