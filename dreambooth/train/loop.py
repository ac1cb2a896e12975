"""The training run: ``Trainer(settings, callbacks, commands).run()``.

Stages: validate -> load the base model -> generate missing class images -> check every image -> cache latents (and
text embeddings when the text encoder is frozen) -> optimizer / schedule (or resume) -> steps -> final save.
Progress goes out through guarded callbacks; commands (cancel, save now, sample now) are read between steps.

Every random draw of a step comes from generators seeded by (seed, sample index): the noise, the timestep and the
latent sample of sample ``g`` do not depend on what ran before, which makes resume exact and the run independent of
how its batches are split.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from pathlib import Path
from typing import Any

from ..data.augment import Augmentation
from ..data.cache import ContentHashes
from ..data.dataset import (
    BucketPlan,
    Example,
    Sample,
    SamplePlan,
    class_examples,
    instance_examples,
    mix_seed,
    validation_examples,
)
from ..data.loss_masks import stack_weights
from ..errors import DreamBoothError
from ..events import Callbacks, Commands, Progress, guarded
from ..settings import Settings
from .distributed import launched_processes
from .distributed import make as make_distributed
from .ema import ema_weights, make_ema
from .families import Conditioning, Family, family_for
from .loss import combine_losses, training_target
from .method import NetworkMethod
from .noising import draw_noise, timestep_range, weighted_sample_losses, zero_terminal_snr_scheduler
from .optimizers import use_averaged_weights, use_training_weights
from .outputs import Outputs, RunState, TrainResult
from .precision import FrozenModules, Placement, frozen_placement, move
from .prior import BasePrior
from .sampling import eval_mode, generate

STEPS_PER_INSTANCE_IMAGE = 100  # the guide's rule of thumb when neither epochs nor steps are given


def resolve_device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DreamBoothError("device 'cuda' was asked for, but torch sees no CUDA GPU; use device auto or cpu")
    return torch.device(name)


def peak_memory_gib(device: Any) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def total_steps_for(settings: Settings, plan: SamplePlan, instance_count: int, batch_size: int | None = None) -> int:
    """``batch_size``: the global batch (per-process batch x processes; default the settings' batch)."""
    if settings.max_train_steps:
        return settings.max_train_steps
    if settings.num_train_epochs:
        batches = plan.batches_per_epoch(batch_size or settings.train_batch_size)
        return max(1, math.ceil(settings.num_train_epochs * batches / settings.gradient_accumulation_steps))
    return max(1, STEPS_PER_INSTANCE_IMAGE * instance_count)


class Trainer(Outputs):
    """One DreamBooth run.  ``components`` may be given (e.g. the WebUI's model already in memory)."""

    def __init__(
        self,
        settings: Settings,
        callbacks: Callbacks | None = None,
        commands: Commands | None = None,
        components: Any = None,
        *,
        cache_text: bool = True,
        final_save: bool = True,
        check_model_path: bool | None = None,
    ):
        """``cache_text`` / ``final_save`` exist for the benchmark's naive configuration; users keep the defaults.

        ``check_model_path`` (default: only when no ``components`` are given) validates the base model's path.
        """
        self.cache_text = cache_text
        self.final_save = final_save
        self.check_model_path = components is None if check_model_path is None else check_model_path
        self.requested = settings
        self.settings = settings.effective()
        self.callbacks = callbacks or Callbacks()
        self.commands = commands or Commands()
        self.components = components
        self.text_cache: dict[str, Any] = {}  # prompt -> hidden states of the frozen text encoder(s)
        self.pooled_cache: dict[str, Any] = {}  # prompt -> pooled text embedding (SDXL)
        self.latent_cache = None
        self.inpainting_inputs: Any = None  # masks and masked-image latents, for inpainting models
        self.loss_masks: Any = None  # the masked loss's masks (data/loss_masks.py), when masked_loss is on
        self.dist: Any = None
        self.frozen: FrozenModules | None = None  # the VAE / frozen text encoder in the run's dtype (precision.py)
        self.method: NetworkMethod | None = None  # a LoRA / LoHa / LoKr run's adapter (train/method.py)
        self.held_out: list[Example] = []  # instance images of the validation loss, never trained on
        self.validation: Any = None  # the validation loss (train/validation_loss.py), when images are held out
        self.ema: Any = None  # use_ema: the average of the trained weights (train/ema.py)
        self.prior: Any = None  # prior_from_base_model: the base model's predictions (train/prior.py)
        self.bucket_of: dict[Path, Any] = {}
        self.augmentation = Augmentation.from_settings(self.settings)
        self.contents = ContentHashes()
        self.timings = {"data": 0.0, "forward_backward": 0.0, "optimizer": 0.0}

    # ------------------------------------------------------------------------------------------------ events

    def _emit(self, phase: str, message: str = "", **values: Any) -> None:
        progress = Progress(phase=phase, message=message, **values)
        guarded(self.callbacks, "on_progress", progress)
        if message:
            guarded(self.callbacks, "on_log", message)

    def log(self, message: str) -> None:
        guarded(self.callbacks, "on_log", message)

    # ------------------------------------------------------------------------------------------------ set-up

    def _load(self, device: Any) -> Any:
        import torch

        from ..models.components import drop_base_ema, load_components
        from ..validation import training_warnings

        s = self.settings
        components = self.components
        if components is None:
            self._emit("loading", f"loading {s.pretrained_model_name_or_path}")
            components = load_components(s.pretrained_model_name_or_path)
        dropped = drop_base_ema(components)
        if dropped:
            self.log(f"dropped {dropped} EMA tensors (model_ema.*) of the base file: they were not trained")
        if s.pretrained_vae_name_or_path:
            from ..models.components import load_vae

            components.vae, components.arch = load_vae(s.pretrained_vae_name_or_path, components.arch)
        problem = family_for(components).check(components, s.clip_skip)
        if problem:
            raise DreamBoothError(problem)
        for warning in training_warnings(s, components.arch, components.tokenizer):  # known once loaded
            self.log(f"warning: {warning}")
        if not s.trains_network:  # a frozen UNet is placed with the other frozen modules
            move(components.unet, device, torch.float32)
        self.frozen = FrozenModules(components, self.frozen_placement(components, device), device)
        if s.attention == "xformers":
            components.unet.enable_xformers_memory_efficient_attention()
        return components

    def frozen_placement(self, components: Any, device: Any) -> dict[str, Placement]:
        """Where the VAE and text encoder are during the steps, and their dtype (train/precision.py)."""
        from ..models.inpainting import is_inpainting

        family = family_for(components)
        return frozen_placement(
            self.settings,
            device,
            inpainting=is_inpainting(components),
            cache_text=self.cache_text,
            text_encoders=family.text_encoder_names,
            vae_in_fp32=family.vae_in_fp32 and not self.settings.pretrained_vae_name_or_path,  # a given VAE: its dtype
        )

    @property
    def family(self) -> Family:
        """What the model's family does differently (train/families)."""
        return family_for(self.components)

    def _class_images(self, components: Any) -> None:
        from ..data.class_images import generate_class_images, usable_class_images

        s = self.settings
        for index, concept in enumerate(s.concepts):
            wanted = s.class_images_for(concept)
            have = len(usable_class_images(concept.class_data_dir, concept.class_prompt))
            self.dist.barrier()  # every process has counted before any writes
            made = generate_class_images(
                components,
                concept.class_data_dir,
                concept.class_prompt,
                concept.class_negative_prompt,
                wanted,
                seed=mix_seed(s.seed, "class", index) % (2**31),
                steps=s.class_inference_steps,
                guidance_scale=s.save_guidance_scale,
                resolution=s.resolution,
                batch_size=s.sample_batch_size,
                clip_skip=s.clip_skip,
                device=self.dist.device,
                autocast_dtype=self._autocast_dtype(),
                shard=(self.dist.rank, self.dist.world_size),
                have=have,
                should_stop=lambda: self.commands.cancelled,
                on_progress=lambda done, total, i=index: self._emit(
                    "class_images", f"concept {i + 1}: class image {done} of {total}", step=done, total_steps=total
                ),
            )
            if made:
                self.log(f"concept {index + 1}: generated {len(made)} class images in {concept.class_data_dir}")

    def _autocast_dtype(self) -> Any:
        """The run's mixed-precision dtype (None: fp32), for image generation as for the steps."""
        import torch

        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.settings.mixed_precision)

    def _examples(self) -> tuple[list[list[Example]], list[list[Example]] | None]:
        from ..data.images import check_images

        s = self.settings
        split = [validation_examples(s, i, c, instance_examples(s, i, c)) for i, c in enumerate(s.concepts)]
        instances, self.held_out = [trained for trained, _ in split], [e for _, held in split for e in held]
        classes = [class_examples(s, i, c) for i, c in enumerate(s.concepts)] if s.has_prior_preservation else None
        paths = [e.path for group in instances + (classes or []) + [self.held_out] for e in group]
        problems = check_images(paths)
        if problems:
            lines = "\n".join(f"  {p.path}: {p.reason}" for p in problems)
            raise DreamBoothError(f"{len(problems)} image(s) cannot be used; fix or remove them:\n{lines}")
        if s.use_aspect_ratio_bucket:
            self._assign_buckets(paths)
        if s.masked_loss:  # every mask checked now
            from ..data.loss_masks import LossMasks

            self.loss_masks = LossMasks(self, [e.path for group in instances for e in group])
        for index, group in enumerate(instances):
            if not group:
                raise DreamBoothError(
                    f"concept {index + 1}: no instance images in {s.concepts[index].instance_data_dir}"
                )
        if classes is not None:
            for index, group in enumerate(classes):
                if not group:
                    raise DreamBoothError(
                        f"concept {index + 1}: no class images in {s.concepts[index].class_data_dir} "
                        "(generation was cancelled or num_class_images is 0)"
                    )
        return instances, classes

    def _assign_buckets(self, paths: list[Path]) -> None:
        import json

        from ..data.buckets import assign_buckets, bucket_report, resolve_buckets

        s = self.settings
        self.bucket_of = assign_buckets(paths, resolve_buckets(s))
        report = bucket_report(self.bucket_of)
        self.log("aspect-ratio buckets: " + ", ".join(f"{b} x{n}" for b, n in report["counts"].items()))
        if s.debug_arb:
            for path, bucket in report["images"].items():
                self.log(f"bucket {bucket}: {path}")
            from ..models.files import atomic_path

            with atomic_path(Path(s.output_dir) / "buckets.json") as temp:
                temp.write_text(json.dumps(report, indent=2), encoding="utf-8")

    def _size(self, example: Example) -> tuple[int, int] | None:
        """The training size of an example: its bucket with ARB, else None (the square resolution)."""
        bucket = self.bucket_of.get(example.path)
        return None if bucket is None else (bucket.width, bucket.height)

    def _variant(self, sample_index: int) -> int:
        """Which cached augmentation variant a sample uses (uncached: every sample its own)."""
        if self.augmentation is None:
            return 0
        if self.latent_cache is None:
            return sample_index
        return random.Random(mix_seed(self.settings.seed, "variant", sample_index)).randrange(
            self.settings.augment_variants
        )

    # ------------------------------------------------------------------------------------------------ steps

    def _pixels(self, example: Example, flip: bool, sample_index: int, epoch: int) -> Any:
        """The (3, H, W) pixels in [-1, 1] a sample's latent is made from (cached: the cached latent's crop)."""
        from ..data.cache import pixels

        size, variant = self._size(example), self._variant(sample_index)
        if self.latent_cache is not None:
            return self.latent_cache.pixels(example.path, flip, size, variant)
        return pixels(*self._image_arguments(example, flip, sample_index, epoch))

    def _crop(self, example: Example, flip: bool, sample_index: int, epoch: int) -> Any:
        """The :class:`~dreambooth.data.images.Crop` of the pixels :meth:`_pixels` gives (cached: the cached
        latent's), for SDXL's time ids."""
        from ..data.cache import crop_of

        size, variant = self._size(example), self._variant(sample_index)
        if self.latent_cache is not None:
            return self.latent_cache.crop(example.path, flip, size, variant)
        return crop_of(*self._image_arguments(example, flip, sample_index, epoch))

    def _image_arguments(self, example: Example, flip: bool, sample_index: int, epoch: int) -> tuple:
        """The arguments of data/cache.py's ``pixels`` for an uncached sample: a new crop each epoch."""
        s = self.settings
        size, variant = self._size(example), self._variant(sample_index)
        content = self.contents.get(example.path)
        crop_seed = mix_seed(s.seed, "crop", content, epoch)
        augment_seed = mix_seed(s.seed, "augment", content, "sample", variant)
        return example.path, size or s.resolution, s.center_crop, flip, crop_seed, self.augmentation, augment_seed

    def _latent(
        self, example: Example, flip: bool, sample_index: int, generator: Any, epoch: int, image: Any = None
    ) -> Any:
        """A latent sample of the example; ``image``: its pixels when already made (see :meth:`_pixels`)."""
        import torch

        from ..data.cache import latent_distribution

        components = self.components
        if self.latent_cache is not None:
            mean, std = self.latent_cache.get(example.path, flip, self._size(example), self._variant(sample_index))
        else:  # no cache: a new crop (and augmentation) each time, the VAE every step
            if image is None:
                image = self._pixels(example, flip, sample_index, epoch)
            mean, std = latent_distribution(components.vae, image)
        sample = mean + std * torch.randn(mean.shape, generator=generator)
        return sample * components.vae.config.scaling_factor

    def _inpainting(self) -> Any:
        """The inpainting part of a step (masks, masked-image latents), or None for other models."""
        from ..models.inpainting import InpaintingInputs, is_inpainting

        if not is_inpainting(self.components):
            return None
        if self.inpainting_inputs is None:
            self.inpainting_inputs = InpaintingInputs(self.components.vae, self.settings.inpainting_full_mask_ratio)
        return self.inpainting_inputs

    def _text(self, prompts: list[str], train_text: bool) -> Any:
        """The UNet's context (hidden states) for ``prompts``: see :meth:`_conditioning`."""
        return self._conditioning(prompts, train_text).hidden

    def _conditioning(self, prompts: list[str], train_text: bool) -> Conditioning:
        """The text conditioning of ``prompts`` by the model's family; a frozen encoder's is cached per prompt."""
        import torch

        components, s, family = self.components, self.settings, self.family
        if train_text or not self.cache_text:
            context = contextlib.nullcontext() if train_text else torch.no_grad()
            with context:
                return family.encode(components, prompts, s.clip_skip)
        missing = [p for p in dict.fromkeys(prompts) if p not in self.text_cache]
        if missing:
            with torch.no_grad():
                encoded = family.encode(components, missing, s.clip_skip)
            for prompt, row in zip(missing, encoded.rows()):
                self.text_cache[prompt] = row.hidden.float()  # fp32 also when the encoder ran in half precision
                if row.pooled is not None:
                    self.pooled_cache[prompt] = row.pooled.float()
        return Conditioning.stack([Conditioning(self.text_cache[p], self.pooled_cache.get(p)) for p in prompts])

    def _noise_scheduler(self) -> Any:
        """The training noise schedule: the model's, or its zero-terminal-SNR rescaling (made once)."""
        if not self.settings.zero_terminal_snr:
            return self.components.noise_scheduler
        if getattr(self, "_rescaled_scheduler", None) is None:
            self._rescaled_scheduler = zero_terminal_snr_scheduler(self.components.noise_scheduler)
        return self._rescaled_scheduler

    def _loss(
        self,
        samples: list[Sample],
        epoch: int,
        train_text: bool,
        device: Any,
        autocast: Any,
        global_counts: tuple[int, int] | None = None,
    ) -> Any:
        """(total, instance, prior) losses of ``samples``.  ``global_counts`` (instance and class samples of the
        whole step over all processes): sums divided by those counts, so the processes' losses add up to the
        step's loss."""
        import torch

        components, s = self.components, self.settings
        scheduler = self._noise_scheduler()
        low, high = timestep_range(s, scheduler)
        started = time.perf_counter()
        inpainting = self._inpainting()
        family = self.family
        mask_weights: list[Any] = []  # the masked loss's per-pixel weights of each latent (None: no mask)
        latents, noise, inputs, timesteps, prompts, is_prior, images, masks = [], [], [], [], [], [], [], []
        crops = []  # SDXL: each latent's crop (its time ids)
        weights = []  # each sample's concept loss_weight (class images: 1, prior_loss_weight comes later)
        from_base: set[int] = set()  # prior_from_base_model: entries whose target is the base model's prediction
        for sample in samples:
            pairs = [(sample.instance, "instance")]
            if sample.prior is not None:
                pairs.append((sample.prior, "prior"))
            for example, role in pairs:
                generator = torch.Generator().manual_seed(mix_seed(s.seed, "sample", sample.index, role))
                image = None
                if inpainting is not None:  # the masked image is made from the pixels the latent comes from
                    image = self._pixels(example, sample.flip, sample.index, epoch)
                    images.append(image)
                    masks.append(inpainting.mask(image, mix_seed(s.seed, "mask", sample.index, role)))
                latent = self._latent(example, sample.flip, sample.index, generator, epoch, image)
                latents.append(latent)
                if family.uses_crops:
                    crops.append(self._crop(example, sample.flip, sample.index, epoch))
                if self.loss_masks is not None:  # the mask with the latent's own crop, variant and flip
                    weight = self.loss_masks.weights(example, sample.flip, sample.index, epoch, latent.shape)
                    mask_weights.append(weight)
                plain = torch.randn(latent.shape, generator=generator)
                timesteps.append(torch.randint(low, high, (1,), generator=generator))
                target_noise, input_noise = draw_noise(s, plain, generator)  # offset noise, input perturbation
                noise.append(target_noise)
                inputs.append(input_noise)
                prompts.append(example.prompt)
                is_prior.append(role == "prior")
                weights.append(1.0 if role == "prior" else s.concepts[example.concept].loss_weight)
            if self.prior is not None:  # prior_from_base_model: the instance's noisy latent with the class prompt
                for values in (latents, noise, inputs, timesteps, images, masks, crops):
                    values.extend(values[-1:])
                if mask_weights:
                    mask_weights.append(None)  # the base model's prediction is matched everywhere
                weights.append(1.0)
                prompts.append(self.prior.class_prompt(sample.instance))
                is_prior.append(True)
                from_base.add(len(latents) - 1)
        self.timings["data"] += time.perf_counter() - started
        # One forward pass per latent shape (with buckets, a class image may have another shape than its instance).
        shapes: dict[tuple[int, ...], list[int]] = {}
        for index, latent in enumerate(latents):
            shapes.setdefault(tuple(latent.shape), []).append(index)
        per_sample = torch.empty(len(latents), device=device)
        for indices in shapes.values():
            group_latents = torch.stack([latents[i] for i in indices]).to(device)
            group_noise = torch.stack([noise[i] for i in indices]).to(device)
            group_steps = torch.cat([timesteps[i] for i in indices]).to(device)
            group_inputs = torch.stack([inputs[i] for i in indices]).to(device)
            noisy = scheduler.add_noise(group_latents, group_inputs, group_steps)
            if inpainting is not None:  # + the mask and the masked image's latents (9 input channels)
                encode_started = time.perf_counter()
                conditioning = inpainting.conditioning(
                    torch.stack([images[i] for i in indices]), torch.stack([masks[i] for i in indices])
                )
                noisy = inpainting.unet_input(noisy, conditioning.to(device))
                self.timings["data"] += time.perf_counter() - encode_started
            with autocast:
                conditioning = self._conditioning([prompts[i] for i in indices], train_text).to(device)
                unet_inputs = family.unet_inputs(conditioning, [crops[i] for i in indices] if crops else None)
                prediction = components.unet(noisy, group_steps, **unet_inputs).sample
            target = training_target(scheduler, group_latents, group_noise, group_steps)
            if from_base:
                group_prompts = [prompts[i] for i in indices]
                is_base = [i in from_base for i in indices]
                group_crops = [crops[i] for i in indices] if crops else None
                target = self.prior.targets(target, is_base, noisy, group_steps, group_prompts, autocast, group_crops)
            where = (torch.tensor(indices, device=device),)
            group_masks = stack_weights([mask_weights[i] for i in indices]) if mask_weights else None
            per_sample = per_sample.index_put(
                where, weighted_sample_losses(s, scheduler, prediction, target, group_steps, group_masks)
            )
        if any(w != 1.0 for w in weights):
            per_sample = per_sample * torch.tensor(weights, device=device)
        counts = global_counts or (is_prior.count(False), is_prior.count(True))  # counted here, not from a tensor
        return combine_losses(per_sample, torch.tensor(is_prior, device=device), s.prior_loss_weight, counts)

    # ------------------------------------------------------------------------------------------------ outputs

    def _sample_prompts(self) -> list[str]:
        s = self.settings
        if s.save_sample_prompt:
            return [s.save_sample_prompt]
        return list(
            dict.fromkeys((c.sample_prompt or c.instance_prompt).replace("[filewords]", "").strip() for c in s.concepts)
        )

    def _write_images(self, images: list[Any], folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, image in enumerate(images):
            path = folder / f"{index:03d}.png"
            image.save(path)
            paths.append(path)
        return paths

    def _images(
        self, prompts: list[str], negative: str, seed: int, count: int, folder: Path, device: Any
    ) -> list[Path]:
        adapter = self.method.network if self.method is not None else None
        with eval_mode(adapter) if adapter is not None else contextlib.nullcontext():  # no adapter dropout
            images = self._generate(prompts, negative, seed, count, device)
        return self._write_images(images, folder)

    def _generate(self, prompts: list[str], negative: str, seed: int, count: int, device: Any) -> list[Any]:
        s = self.settings
        return generate(
            self.components,
            prompts,
            negative_prompt=negative,
            steps=s.save_infer_steps,
            guidance_scale=s.save_guidance_scale,
            seed=seed,
            images_per_prompt=count,
            resolution=s.resolution,
            clip_skip=s.clip_skip,
            batch_size=s.sample_batch_size,
            device=device,
            autocast_dtype=self._autocast_dtype(),
            zero_terminal_snr=s.zero_terminal_snr,
        )

    def _samples(self, step: int, result: TrainResult, device: Any) -> None:
        s = self.settings
        if s.n_save_sample <= 0:
            return
        self._emit("sampling", f"making samples at step {step}", step=step)
        folder = Path(s.output_dir) / "samples" / f"step_{step:06d}"
        paths = self._images(
            self._sample_prompts(), s.save_sample_negative_prompt, s.sample_seed, s.n_save_sample, folder, device
        )
        result.samples.extend(paths)
        guarded(self.callbacks, "on_samples", step, paths)

    def _tests(self, step: int, result: TrainResult, device: Any) -> None:
        s = self.settings
        prompts = [s.test_prompt] if s.test_prompt else []
        if s.test_prompts_file:
            lines = Path(s.test_prompts_file).read_text(encoding="utf-8", errors="replace").splitlines()
            prompts += [line.strip() for line in lines if line.strip()]
        if prompts:
            folder = Path(s.output_dir) / "tests" / f"step_{step:06d}"
            self._images(prompts, s.test_negative_prompt, s.test_seed, s.test_images_per_prompt, folder, device)

    # ------------------------------------------------------------------------------------------------ run

    def run(self) -> TrainResult:
        """Set-up, steps, outputs.  Any exception after set-up keeps a resumable state of the last complete step
        (when its weights are sound) and ends as :class:`TrainingFailed`, whose message says where and how to
        resume."""
        s = self.settings
        s.raise_if_invalid(model_in_memory=not self.check_model_path)
        self.dist = make_distributed(s.device, resolve_device(s.device) if launched_processes() <= 1 else None)
        if not self.dist.is_main:
            self.callbacks = Callbacks()  # only the main process reports progress, samples and checkpoints
        from ..memory.fit import apply_low_memory  # low_memory: the fit preset for this GPU, before any weights load

        s = self.settings = apply_low_memory(s, self.dist.device, self.log, self.dist.world_size)
        Path(s.output_dir).mkdir(parents=True, exist_ok=True)
        run = None
        try:
            run = self._setup()
            self._steps(run)
            self._outputs(run)
        except Exception as error:
            failure = self._failure(run, error)
            if failure is error:
                raise
            raise failure from error
        finally:
            self._restore(run)
        return self._finished(run)

    def _setup(self) -> RunState:
        """Load, class images, examples and their plan, caches, optimizer and schedule (or the resumed state)."""
        s, dist = self.settings, self.dist
        self.components = components = self._load(dist.device)
        if s.has_prior_preservation:
            self._class_images(components)
            dist.barrier()  # every process's share of the class images is written
        instances, classes = self._examples()
        global_batch = s.train_batch_size * dist.world_size
        repeats = [c.repeats for c in s.concepts]
        if s.use_aspect_ratio_bucket:
            plan = BucketPlan(instances, classes, s.seed, s.hflip, self.bucket_of, global_batch, repeats)
        else:
            plan = SamplePlan(instances, classes, s.seed, s.hflip, repeats)
        if self.held_out:
            from .validation_loss import ValidationLoss

            self.validation = ValidationLoss(self, self.held_out)
        total = total_steps_for(s, plan, sum(len(g) for g in instances), global_batch)
        self._cache(instances, classes)
        return self._optimization(plan, global_batch, total)

    def _cache(self, instances: list[list[Example]], classes: list[list[Example]] | None) -> None:
        """Latents (and text embeddings of a frozen encoder) once; then the modules whose outputs are cached leave
        the training device (train/precision.py)."""
        self._fill_caches([e for group in instances + (classes or []) for e in group])
        if self.validation is not None:  # its latents and text embeddings, while the VAE and encoder are here
            self.validation.prepare()
        if self.settings.prior_from_base_model:  # before anything trains and before the text encoder is parked
            self.prior = BasePrior(self)
            self.prior.prepare(instances, self.dist.device)
        self.frozen.park(self.components)

    def _fill_caches(self, examples: list[Example]) -> None:
        s, dist = self.settings, self.dist
        if s.cache_latents:
            self.latent_cache = self._new_latent_cache()
            flips = (False, True) if s.hflip else (False,)
            variants = range(s.augment_variants) if self.augmentation else range(1)
            if dist.world_size > 1:  # each process encodes its share to the shared disk cache first
                for example in examples[dist.rank :: dist.world_size]:
                    for flip in flips:
                        for variant in variants:
                            self.latent_cache.get(example.path, flip, self._size(example), variant)
                dist.barrier()
            for number, example in enumerate(examples, start=1):
                for flip in flips:
                    for variant in variants:
                        self.latent_cache.get(example.path, flip, self._size(example), variant)
                self._emit("caching", f"latents {number} of {len(examples)}", step=number, total_steps=len(examples))
        if not self._trains_text() and self.cache_text:
            self._text([e.prompt for e in examples], train_text=False)  # every embedding now: the encoder may go

    def _new_latent_cache(self) -> Any:
        from ..data.cache import LatentCache

        s = self.settings
        return LatentCache(
            self.contents,
            self.components.vae,
            s.resolution,
            s.center_crop,
            s.seed,
            Path(s.output_dir) / "cache" / "latents",
            self.augmentation,
        )

    def _optimizer_construction(self) -> Any:
        """The context optimizer objects are built in (the memory dry run's differs)."""
        return contextlib.nullcontext()

    def _build_network(self, components: Any) -> Any:
        """The run's adapter (dreambooth/network/adapter.py; the memory dry run builds it otherwise)."""
        from ..network.adapter import build_network

        return build_network(components, self.settings)

    def _optimization(self, plan: SamplePlan, global_batch: int, total: int) -> RunState:
        import torch

        from .optim import make_lr_scheduler, make_optimizer
        from .state import find_state, load_state

        s, dist = self.settings, self.dist
        device = dist.device
        unet = self.components.unet
        per_step = s.train_batch_size * s.gradient_accumulation_steps * dist.world_size
        scale = per_step if s.scale_lr else 1
        if s.trains_network:
            self.method = NetworkMethod(self)
            groups, modules = self.method.setup(scale)
        else:
            if s.gradient_checkpointing:
                unet.enable_gradient_checkpointing()
            if s.full_bf16:  # the trained weights in bf16 (see train/paramwise.py)
                unet.bfloat16()
            groups = [{"params": list(unet.parameters()), "lr": s.learning_rate * scale}]
            modules = {"unet": unet}
            unet.requires_grad_(True).train()
        if s.train_text_encoder:
            for name, lr in self._text_learning_rates().items():
                text_encoder = getattr(self.components, name)
                if s.full_bf16:
                    text_encoder.bfloat16()
                text_encoder.requires_grad_(True).train()
                if s.gradient_checkpointing:
                    text_encoder.gradient_checkpointing_enable()
                groups.append({"params": list(text_encoder.parameters()), "lr": lr * scale})
                modules[name] = text_encoder
        optimizer = make_optimizer(groups, s, device, self._optimizer_construction)
        scaler = torch.amp.GradScaler(device.type) if s.mixed_precision == "fp16" else None
        autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(s.mixed_precision)
        run = RunState(
            device=device,
            plan=plan,
            global_batch=global_batch,
            total=total,
            modules=modules,
            groups=groups,
            optimizer=optimizer,
            lr_scheduler=make_lr_scheduler(optimizer, s, total),
            scaler=scaler,
            autocast=torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext(),
            text_stop_step=math.ceil(s.stop_text_encoder * total) if self._trains_text() else 0,
            result=TrainResult(step=0, total_steps=total, cancelled=False),
        )
        self.ema = make_ema(s, modules, groups, self._ema_device(device))
        if s.resume_from:
            folder = find_state(s.resume_from) or Path(s.resume_from)
            run.start = run.step = run.state_step = load_state(
                folder, modules, optimizer, run.lr_scheduler, scaler, s.optimizer, self.ema
            )
            self.log(f"resumed from {folder} at step {run.start}")
            if self.ema is not None and self.ema.restarted:
                self.log("the state holds no EMA (use_ema was off): the EMA starts from the resumed weights")
        run.writer = self._logger(Path(s.output_dir)) if dist.is_main else None
        return run

    def _text_learning_rates(self) -> dict[str, float]:
        """The trained text encoders (train_text_encoder) and their learning rates; SDXL's second encoder has its
        own (0: it stays frozen)."""
        s = self.settings
        rates = {"text_encoder": s.text_encoder_lr(), "text_encoder_2": s.text_encoder_2_lr()}
        names = self.family.text_encoder_names
        return {name: rates[name] for name in names if rates[name] > 0 or name == "text_encoder"}

    def _ema_device(self, device: Any) -> Any:
        """Where the EMA lives: the training device, or the CPU with ema_on_cpu."""
        return "cpu" if self.settings.ema_on_cpu else device

    def resident_tensors(self) -> dict[str, list[Any]]:
        """Tensors on the training device besides the modules and the optimizer, by memory label: the EMA, the
        base model's copy (the memory estimate registers them)."""
        tensors = {}
        if self.ema is not None and str(self.ema.device) == str(self.dist.device):
            tensors["EMA weights (fp32)"] = list(self.ema.shadow.values())
        if self.prior is not None:
            tensors["base model for the prior"] = self.prior.resident_tensors()
        return tensors

    def _steps(self, run: RunState) -> None:
        """Steps until the total; a save or samples when due or asked for; cancel stops between steps."""
        s, dist = self.settings, self.dist
        while run.step < run.total:
            if dist.broadcast_flags([self.commands.cancelled])[0]:
                run.result.cancelled = True
                return
            started = time.perf_counter()
            losses = self._step(run)
            run.step_times.append(time.perf_counter() - started)
            self._report(run, losses)
            if self.validation is not None:
                self.validation.after_step(run)  # when due: the validation loss, and NAME_best with save_best
            due = s.save_model_every_n_steps and run.step % s.save_model_every_n_steps == 0 and run.step < run.total
            save_now, sample_now = dist.broadcast_flags([self.commands.take("save"), self.commands.take("sample")])
            if due or save_now:
                self._save_and_sample(run)
            elif sample_now:
                use_averaged_weights(run.optimizer)  # schedule-free: samples of the averaged weights
                if dist.is_main:
                    with ema_weights(self.ema):  # use_ema: samples of the EMA
                        self._samples(run.step, run.result, run.device)
                dist.barrier()

    def _step(self, run: RunState) -> list[tuple[float, float, float | None]]:
        """One optimizer step (its micro-batches); returns (total, instance, prior) loss of each micro-batch."""
        import torch

        s, dist = self.settings, self.dist
        step = run.step
        train_text = self._trains_text() and step < run.text_stop_step
        if self._trains_text() and not train_text and run.text_training:
            run.text_training = False
            if self.method is not None:
                self.method.freeze_text()
            for text_encoder in self.family.text_encoders(self.components):
                text_encoder.requires_grad_(False).eval()
            self.log(f"text encoder frozen at step {step} (stop_text_encoder {s.stop_text_encoder})")
        use_training_weights(run.optimizer)  # schedule-free: from its averaged weights (after a save) back to these
        losses = []
        if s.fused_backward or s.full_bf16:  # a ParamwiseOptimizer: the step seeds full_bf16's stochastic rounding
            run.optimizer.step_number = step
        for micro in range(s.gradient_accumulation_steps):
            batch_index = step * s.gradient_accumulation_steps + micro
            samples = run.plan.batch(batch_index, run.global_batch)
            epoch = run.plan.epoch_of_batch(batch_index, run.global_batch)
            counts = None
            if dist.world_size > 1:  # this process's slice of the step's samples
                counts = (len(samples), sum(x.prior is not None or self.prior is not None for x in samples))
                samples = samples[dist.rank * s.train_batch_size : (dist.rank + 1) * s.train_batch_size]
            fb_started = time.perf_counter()
            values = [0.0, 0.0, 0.0]
            if samples:
                with self.method.randomness(batch_index) if self.method else contextlib.nullcontext():
                    loss, instance_loss, prior_loss = self._loss(
                        samples, epoch, train_text, run.device, run.autocast, counts
                    )
                scaled = loss / s.gradient_accumulation_steps
                if s.fused_backward and micro == s.gradient_accumulation_steps - 1:
                    run.updating = True  # this backward pass updates each weight as soon as its gradient is complete
                    run.optimizer.arm()
                (run.scaler.scale(scaled) if run.scaler else scaled).backward()
                values = self._loss_values(loss, instance_loss, prior_loss)
            self.timings["forward_backward"] += time.perf_counter() - fb_started
            has_prior = counts[1] > 0 if counts else any(x.prior is not None for x in samples) or self.prior is not None
            total_value, instance_value, prior_value = dist.sum_values(values)
            losses.append((total_value, instance_value, prior_value if has_prior else None))
        opt_started = time.perf_counter()
        params = [p for g in run.groups for p in g["params"] if p.requires_grad]
        dist.sum_gradients(params)
        if run.scaler:
            run.scaler.unscale_(run.optimizer)
        if s.max_grad_norm > 0 and not s.fused_backward:  # fused: each parameter's gradient was clipped alone
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], s.max_grad_norm)
        run.updating = True  # from here until the step is counted, an exception leaves the weights half-updated
        if run.scaler:
            run.scaler.step(run.optimizer)
            run.scaler.update()
        else:
            run.optimizer.step()
        run.lr_scheduler.step()
        run.step += 1
        if self.ema is not None:
            self.ema.after_step(run.step)
        run.updating = False
        run.optimizer.zero_grad(set_to_none=True)
        self.timings["optimizer"] += time.perf_counter() - opt_started
        return losses

    def _trains_text(self) -> bool:
        """The text encoder (or its adapters) trains in this run."""
        s = self.settings
        return s.network_train_text_encoder if s.trains_network else s.train_text_encoder

    def _loss_values(self, loss: Any, instance_loss: Any, prior_loss: Any) -> list[float]:
        """The losses as numbers (a device sync; the memory estimate's dry run has no numbers and skips it)."""
        return [loss.item(), instance_loss.item(), 0.0 if prior_loss is None else prior_loss.item()]

    def _report(self, run: RunState, losses: list[tuple[float, float, float | None]]) -> None:
        s, step = self.settings, run.step
        mean_loss = sum(x[0] for x in losses) / len(losses)
        priors = [x[2] for x in losses if x[2] is not None]
        run.result.losses.append((step, mean_loss))
        recent = run.step_times[-20:]
        seconds = sorted(recent)[len(recent) // 2]
        lrs = {f"group{i}": g["lr"] for i, g in enumerate(run.optimizer.param_groups)}
        self._emit(
            "training",
            step=step,
            total_steps=run.total,
            epoch=run.plan.epoch_of_batch(step * s.gradient_accumulation_steps - 1, run.global_batch),
            loss=mean_loss,
            instance_loss=sum(x[1] for x in losses) / len(losses),
            prior_loss=sum(priors) / len(priors) if priors else None,
            learning_rates=lrs,
            seconds_per_step=seconds,
            eta_seconds=seconds * (run.total - step),
            peak_memory_gib=peak_memory_gib(run.device),
        )
        if run.writer is not None:
            run.writer.log(step, {"loss": mean_loss, **{f"lr/{k}": v for k, v in lrs.items()}})

    def _outputs(self, run: RunState) -> None:
        """The final save and samples; a cancelled run saves a resumable state (and its checkpoint)."""
        step, cancelled = run.step, run.result.cancelled
        use_averaged_weights(run.optimizer)  # schedule-free: the output (and the modules after the run) averaged
        if cancelled:
            self._emit(
                "cancelled", f"cancelled at step {step}; saving a resumable state", step=step, total_steps=run.total
            )
        if run.last_saved != step and (step > run.start or cancelled) and self.final_save:
            self._save_and_sample(run, samples=not cancelled)

    def _restore(self, run: RunState | None) -> None:
        """Whatever happened: the log closed, an adapter taken off, the modules frozen and back on the training
        device."""
        if self.method is not None:
            self.method.restore()
        if run is not None and run.writer is not None:
            run.writer.close()
        if run is not None:
            if self.settings.fused_backward:
                run.optimizer.close()  # the modules outlive the run (the WebUI's model): no hooks left on them
            if self.settings.full_bf16:  # the trained modules back in fp32 (exact: bf16 values are fp32 values)
                for module in run.modules.values():
                    module.float()
        components = self.components
        if components is None or self.dist is None or not hasattr(components, "unet"):
            return
        text_encoders = self.family.text_encoder_names
        components.unet.requires_grad_(False).eval()
        for name in text_encoders:
            getattr(components, name).requires_grad_(False).eval()
        if self.frozen is not None:  # the exact fp32 modules, not their half-precision copies
            self.frozen.restore(components, self.dist.device)
        components.vae.to(self.dist.device)
        for name in text_encoders:
            getattr(components, name).to(self.dist.device)

    def _finished(self, run: RunState) -> TrainResult:
        result = run.result
        result.step = run.step
        result.step_seconds = run.step_times
        result.seconds_per_step = sorted(run.step_times)[len(run.step_times) // 2] if run.step_times else None
        result.peak_memory_gib = peak_memory_gib(run.device)
        word = "cancelled" if result.cancelled else "finished"
        self._emit(
            "cancelled" if result.cancelled else "done",
            f"{word} at step {run.step} of {run.total}",
            step=run.step,
            total_steps=run.total,
        )
        return result

    def _logger(self, out: Path) -> Any:
        from .logging import make_logger

        s = self.settings
        folder = Path(s.logging_dir)
        if not folder.is_absolute():
            folder = out / folder
        return make_logger(s.report_to, folder, self.requested.to_dict())
