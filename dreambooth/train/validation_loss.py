"""The validation loss: the training loss on held-out images, made deterministic so that checkpoints compare.

Held-out images (``validation_split`` of each concept's instance images, or a concept's ``validation_data_dir``;
data/dataset.py ``validation_examples``) are never trained on.  Every ``validation_steps`` optimizer steps and at the
end, each of them is noised at :data:`VALIDATION_TIMESTEPS` fixed timesteps spread over the training range, with
noise drawn from (seed, the image's content) -- its own generators, so turning validation on changes no draw of the
training run -- from the mean of its latent distribution (no latent sampling), at the square resolution (or its
bucket), centre-cropped as ``center_crop`` says, unflipped, without augmentation.  The UNet runs in eval mode without
gradients, under the run's autocast; the loss is the training loss (loss_type, Huber c, Min-SNR and debiased
weights) of plain noise (no offset noise or input perturbation, which are training tricks), averaged over images and
timesteps.  Same weights, same number.  Every process computes the whole loss (the same number), so all agree on
``save_best`` without a collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data.dataset import Example, mix_seed
from .loss import training_target
from .noising import timestep_range, weighted_sample_losses
from .optimizers import use_averaged_weights
from .sampling import eval_mode

VALIDATION_TIMESTEPS = 4  # timesteps per image: the middles of 4 equal parts of the training range


def validation_timesteps(low: int, high: int, count: int = VALIDATION_TIMESTEPS) -> list[int]:
    """``count`` timesteps in [low, high): the middle of each of ``count`` equal parts of the range."""
    return sorted({low + (2 * k + 1) * (high - low) // (2 * count) for k in range(count)})


@dataclass
class HeldOut:
    """One held-out image, ready to be noised: its latents (C, H, W), noises (K, C, H, W), prompt, and for inpainting
    models its mask and masked-image latents."""

    example: Example
    latent: Any
    noise: Any
    conditioning: Any = None
    crop: Any = None  # the pixels' crop (SDXL's time ids)


def recorded_best(path: Path) -> float | None:
    """The validation loss a previous NAME_best.safetensors was saved with (its metadata), or None."""
    if not path.is_file() or path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as file:
            value = (file.metadata() or {}).get("dreambooth.validation_loss")
        return float(value) if value is not None else None
    except Exception:  # an unreadable file is replaced by the next best
        return None


class ValidationLoss:
    """The validation loss of one run (``trainer``: the :class:`~dreambooth.train.loop.Trainer`)."""

    def __init__(self, trainer: Any, examples: list[Example]):
        self.trainer = trainer
        self.examples = list(examples)
        self.items: list[HeldOut] = []
        self.timesteps: list[int] = []
        self.history: list[tuple[int, float]] = []  # (step, validation loss)
        self.best: float | None = None
        self._looked_for_best = False

    def prepare(self) -> None:
        """Latents, noises and text embeddings of the held-out images, once (the VAE and a frozen text encoder are
        still on the training device)."""
        import torch

        from ..data.cache import latent_distribution, pixels_and_crop

        trainer = self.trainer
        s, vae = trainer.settings, trainer.components.vae
        low, high = timestep_range(s, trainer._noise_scheduler())
        self.timesteps = validation_timesteps(low, high)
        inpainting = trainer._inpainting()
        for example in self.examples:
            content = trainer.contents.get(example.path)
            size = trainer._size(example) or s.resolution
            image, crop = pixels_and_crop(
                example.path, size, s.center_crop, False, mix_seed(s.seed, "validation crop", content)
            )
            mean, _ = latent_distribution(vae, image)
            latent = mean * vae.config.scaling_factor
            generator = torch.Generator().manual_seed(mix_seed(s.seed, "validation", content))
            noise = torch.randn((len(self.timesteps), *latent.shape), generator=generator)
            conditioning = None
            if inpainting is not None:
                mask = inpainting.mask(image, mix_seed(s.seed, "validation mask", content))
                conditioning = inpainting.conditioning(image.unsqueeze(0), mask.unsqueeze(0)).float().cpu()
            self.items.append(HeldOut(example, latent, noise, conditioning, crop))
        if not trainer._trains_text() and trainer.cache_text:
            trainer._text([e.prompt for e in self.examples], train_text=False)
        trainer.log(f"validation loss on {len(self.items)} held-out image(s) at timesteps {self.timesteps}")

    def compute(self, run: Any) -> float:
        """The mean loss over the held-out images and fixed timesteps with the current weights."""
        import torch

        trainer = self.trainer
        s, components, device = trainer.settings, trainer.components, run.device
        scheduler = trainer._noise_scheduler()
        modules = [components.unet]
        if trainer._trains_text():
            modules.append(components.text_encoder)
        if trainer.method is not None:
            modules.append(trainer.method.network)
        use_averaged_weights(run.optimizer)  # schedule-free: the weights a save would keep
        inpainting = trainer._inpainting()
        steps = torch.tensor(self.timesteps, device=device)
        total = 0.0
        with eval_mode(*modules), torch.no_grad():
            for item in self.items:
                count = len(self.timesteps)
                latents = item.latent.unsqueeze(0).expand(count, *item.latent.shape).to(device)
                noise = item.noise.to(device)
                noisy = scheduler.add_noise(latents, noise, steps)
                if item.conditioning is not None:
                    noisy = inpainting.unet_input(noisy, item.conditioning.expand(count, -1, -1, -1).to(device))
                with run.autocast:
                    text = trainer._conditioning([item.example.prompt] * count, trainer._trains_text()).to(device)
                    crops = [item.crop] * count if trainer.family.uses_crops else None
                    inputs = trainer.family.unet_inputs(text, crops)
                    prediction = components.unet(noisy, steps, **inputs).sample
                target = training_target(scheduler, latents, noise, steps)
                total += float(weighted_sample_losses(s, scheduler, prediction, target, steps).double().sum())
        return total / (len(self.items) * len(self.timesteps))

    def is_due(self, step: int, total: int) -> bool:
        return step % self.trainer.settings.validation_steps == 0 or step == total

    def after_step(self, run: Any) -> None:
        """When due: compute, report (progress, log, tensorboard / wandb), and with ``save_best`` save NAME_best
        when the loss is the lowest so far (a resumed run starts from the loss its NAME_best was saved with)."""
        trainer, step = self.trainer, run.step
        if not self.is_due(step, run.total):
            return
        value = self.compute(run)
        self.history.append((step, value))
        trainer._emit(
            "validation",
            f"validation loss {value:.6f} at step {step}",
            step=step,
            total_steps=run.total,
            validation_loss=value,
        )
        if run.writer is not None:
            run.writer.log(step, {"validation_loss": value})
        if not trainer.settings.save_best:
            return
        if not self._looked_for_best and trainer.settings.resume_from:
            self.best = recorded_best(trainer._best_file())
        self._looked_for_best = True
        if self.best is None or value < self.best:
            self.best = value
            trainer._save_best(run, value)
