"""The built-in demo: a real DreamBooth run, offline on the CPU, on a tiny model built on the spot.

It builds a tiny SD 1.x model whose UNet and text encoder are random but whose VAE is first taught, for a few
seconds, to reconstruct small drawn pictures (so that images can be seen at all), draws an instance set with PIL
(one distinctive subject -- a red ring with a yellow centre -- in several positions on varied backgrounds), takes
the base model's samples for the instance prompt, trains (prior preservation on request), and writes the samples
before and after training side by side in one PNG, next to the checkpoint and a loss plot under ``DIR``.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

BACKGROUNDS = [(70, 130, 180), (60, 179, 113), (238, 232, 170), (205, 133, 63), (176, 196, 222), (147, 112, 219)]
SUBJECT = ((220, 20, 30), (250, 220, 40))  # the ring's outer and inner colour
RESOLUTION = 64  # pixels; latents are 8 x 8
INSTANCE_PROMPT, CLASS_PROMPT = "photo of zwx ring", "photo of a ring"


def _colour(rng: random.Random) -> tuple[int, int, int]:
    return (rng.randrange(256), rng.randrange(256), rng.randrange(256))


def draw_scene(rng: random.Random, size: int, subject: bool = True) -> Image.Image:
    """One picture: a background with some clutter and a large ring; ``subject`` draws the demo subject's ring on
    one of its backgrounds, otherwise a ring or square of random colours on a random background."""
    background = rng.choice(BACKGROUNDS) if subject else _colour(rng)
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    for _ in range(3):  # some background clutter
        x, y = rng.randrange(size), rng.randrange(size)
        draw.rectangle((x, y, x + size // 6, y + size // 10), fill=_colour(rng))
    radius = rng.randrange(size // 5, size // 3)
    cx, cy = rng.randrange(radius, size - radius), rng.randrange(radius, size - radius)
    outer, inner = SUBJECT if subject else (_colour(rng), _colour(rng))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if subject or rng.random() < 0.5:
        draw.ellipse(box, fill=outer)
        half = radius // 2
        draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=inner)
    else:
        draw.rectangle(box, fill=outer)
    return image


def draw_instance_images(folder: Path, count: int = 6, size: int = 160, seed: int = 0) -> list[Path]:
    """The demo subject in ``count`` positions and backgrounds, as ``subject-NN.png`` in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for index in range(count):
        path = folder / f"subject-{index:02d}.png"
        draw_scene(rng, size).save(path)
        paths.append(path)
    return paths


def _tensor(images: list[Image.Image]) -> Any:
    """(N, 3, H, W) in [-1, 1], as the VAE takes pixels."""
    import numpy as np
    import torch

    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2) / 127.5 - 1


def teach_vae(vae: Any, images: list[Image.Image], steps: int, seed: int = 0, crop: int = 32, batch: int = 8) -> float:
    """Train ``vae`` in place as a plain autoencoder on random ``crop``-pixel crops of ``images``; returns the last
    mean squared error (pixels in [-1, 1]).

    Then its latents are rescaled so that, times the model's ``scaling_factor``, they have unit standard deviation
    (as SD's VAE and its 0.18215), and its sampling noise is made small: an exact reparametrisation of the layers
    around the latent (``quant_conv`` and ``post_quant_conv``), so decoding is unchanged.
    """
    import math

    import torch

    pixels = _tensor(images)
    generator = torch.Generator().manual_seed(seed)
    vae.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=max(steps, 1), pct_start=0.1)
    size, loss = pixels.shape[-1], torch.tensor(float("nan"))
    for step in range(steps):
        batch_pixels = pixels[torch.randint(0, len(pixels), (batch,), generator=generator)]
        top, left = torch.randint(0, size - crop + 1, (2,), generator=generator).tolist()
        batch_pixels = batch_pixels[:, :, top : top + crop, left : left + crop]
        if step % 2:
            batch_pixels = batch_pixels.flip(-1)
        latents = vae.encode(batch_pixels).latent_dist.mean
        loss = torch.nn.functional.mse_loss(vae.decode(latents).sample, batch_pixels)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    vae.requires_grad_(False).eval()
    with torch.no_grad():
        channels = vae.config.latent_channels
        spread = vae.encode(pixels).latent_dist.mean.std().item()
        factor = 1.0 / (spread * vae.config.scaling_factor)
        vae.quant_conv.weight[:channels] *= factor
        vae.quant_conv.bias[:channels] *= factor
        vae.post_quant_conv.weight /= factor
        vae.quant_conv.weight[channels:] = 0.0  # log-variance: a constant, 0.02 in scaled units
        vae.quant_conv.bias[channels:] = 2 * math.log(0.02 / vae.config.scaling_factor)
    return loss.item()


def nearest_training_distance(images: list[Image.Image], training: list[Image.Image]) -> float:
    """Mean over ``images`` of the root-mean-square pixel difference (RGB in 0..1) to the nearest training image
    or its mirror image: how far the samples are from showing what the model was trained on."""
    import numpy as np

    def arrays(group: list[Image.Image]) -> list[Any]:
        return [np.asarray(i.convert("RGB").resize((RESOLUTION, RESOLUTION)), dtype=np.float32) / 255 for i in group]

    references = [a for t in arrays(training) for a in (t, t[:, ::-1])]
    return float(np.mean([min(np.sqrt(np.mean((a - r) ** 2)) for r in references) for a in arrays(images)]))


def before_after_png(
    training: list[Path], before: list[Path], after: list[Path], path: Path, title: str, after_label: str
) -> Path:
    """One PNG: the training images on top, then the samples before (left) and after (right) training, each
    sample pair on one row; images shown at twice their size."""
    tile, pad, label = 2 * RESOLUTION, 8, 16
    small = RESOLUTION
    width = max(2 * tile + 3 * pad, len(training) * (small + 2) + 2 * pad)
    rows = len(before)
    height = label + pad + label + small + pad + label + rows * (tile + pad) + pad
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((pad, 4), title, fill="black")
    y = label + pad
    draw.text((pad, y), "training images (the subject)", fill="black")
    for index, image_path in enumerate(training):
        with Image.open(image_path) as image:
            sheet.paste(image.convert("RGB").resize((small, small)), (pad + index * (small + 2), y + label))
    y += label + small + pad
    draw.text((pad, y), "before: base model", fill="black")
    draw.text((2 * pad + tile, y), after_label, fill="black")
    y += label
    for before_path, after_path in zip(before, after):
        for column, image_path in enumerate((before_path, after_path)):
            with Image.open(image_path) as image:
                sheet.paste(image.convert("RGB").resize((tile, tile), Image.NEAREST), (pad + column * (tile + pad), y))
        y += tile + pad
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return path


def _open(paths: list[Path]) -> list[Image.Image]:
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def run_demo(
    out: Path, steps: int = 600, vae_steps: int = 400, samples: int = 4, prior_preservation: bool = False
) -> dict[str, Any]:
    """Run the demo into ``out``; returns the paths it wrote and how far the samples before and after training are
    from the training images (:func:`nearest_training_distance`).

    ``prior_preservation`` is off by default: with a random text encoder the class prompt and the instance prompt
    are hard to tell apart, and the base model's class images (coloured blobs) would wash the subject out of the
    few hundred steps a demo can afford.
    """
    import torch

    threads = torch.get_num_threads()
    # The demo's tensors are too small for a second thread to pay off, and on a busy machine two threads spin
    # against each other (measured on a shared 2-core machine: 626 s with two threads, 71 s with one).
    torch.set_num_threads(1)
    try:
        return _run_demo(out, steps, vae_steps, samples, prior_preservation)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out: Path, steps: int, vae_steps: int, samples: int, prior_preservation: bool) -> dict[str, Any]:
    from .events import Callbacks
    from .models.tiny import tiny_components, write_tiny_checkpoint
    from .plot import plot_losses
    from .settings import Concept, Settings
    from .train.loop import Trainer
    from .train.sampling import generate

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    instance_dir = out / "data" / "instance"
    training = draw_instance_images(instance_dir, size=RESOLUTION)
    print(f"[1/5] instance images drawn: {instance_dir}")

    components = tiny_components()
    rng = random.Random(1)
    pictures = [draw_scene(rng, RESOLUTION, subject=index % 2 == 0) for index in range(96)] + _open(training)
    vae_started = time.perf_counter()
    error = teach_vae(components.vae, pictures, vae_steps)
    base = write_tiny_checkpoint(out / "models", "sd1", name="tiny-base", components=components)
    print(
        f"[2/5] tiny SD 1.x base model: {base}\n"
        f"      random UNet and text encoder; its VAE learnt to reconstruct pictures in {vae_steps} steps "
        f"({time.perf_counter() - vae_started:.0f} s, error {error:.3f})"
    )

    settings = Settings(
        pretrained_model_name_or_path=str(base),
        output_dir=str(out / "output"),
        model_name="demo",
        resolution=RESOLUTION,
        train_batch_size=2 if prior_preservation else 4,  # four images a step either way
        max_train_steps=steps,
        learning_rate=1e-3,
        lr_scheduler="constant_with_warmup",
        lr_warmup_steps=max(1, steps // 10),
        with_prior_preservation=prior_preservation,
        prior_loss_weight=1.0,
        num_class_images=6,
        class_inference_steps=10,
        save_infer_steps=20,
        save_guidance_scale=1.0,  # no classifier-free guidance: training never sees the empty prompt
        n_save_sample=samples,
        hflip=True,
        concepts=[
            Concept(
                instance_data_dir=str(instance_dir),
                instance_prompt=INSTANCE_PROMPT,
                class_data_dir=str(out / "data" / "class"),
                class_prompt=CLASS_PROMPT,
            )
        ],
    )
    settings.save(out / "settings.json")

    before_images = generate(
        components,
        [INSTANCE_PROMPT],
        negative_prompt=settings.save_sample_negative_prompt,
        steps=settings.save_infer_steps,
        guidance_scale=settings.save_guidance_scale,
        seed=settings.sample_seed,
        images_per_prompt=samples,
        resolution=RESOLUTION,
        batch_size=settings.sample_batch_size,
    )
    before_dir = out / "output" / "samples" / "step_000000"
    before_dir.mkdir(parents=True, exist_ok=True)
    before = []
    for index, image in enumerate(before_images):
        before.append(before_dir / f"{index:03d}.png")
        image.save(before[-1])
    print(f'[3/5] the base model\'s samples for "{INSTANCE_PROMPT}" (before training): {before_dir}')

    class Printer(Callbacks):
        last_phase = ""

        def on_progress(self, progress):
            if progress.phase != self.last_phase and progress.phase != "training":
                print(f"      {progress.phase}: {progress.message}")
            elif progress.phase == "training" and progress.step % max(1, steps // 6) == 0:
                print(f"      step {progress.step}/{progress.total_steps} loss {progress.loss:.4f}")
            self.last_phase = progress.phase

    print(
        "[4/5] training" + (" with prior preservation (class images are generated first)" if prior_preservation else "")
    )
    result = Trainer(settings, callbacks=Printer()).run()
    after = result.samples[-samples:]
    plot = plot_losses(result.losses, out / "output" / "loss.png", title="demo: training loss")
    comparison = before_after_png(
        training,
        before,
        after,
        out / "output" / "before_after.png",
        title=f'"{INSTANCE_PROMPT}", seeds {settings.sample_seed}..{settings.sample_seed + samples - 1}',
        after_label=f"after: {result.step} steps of DreamBooth",
    )
    distances = {
        name: nearest_training_distance(_open(paths), _open(training))
        for name, paths in (("before", before), ("after", after))
    }
    quarter = max(1, steps // 4)
    first = sum(v for _, v in result.losses[:quarter]) / quarter
    last = sum(v for _, v in result.losses[-quarter:]) / quarter
    print(
        f"[5/5] done in {time.perf_counter() - started:.0f} s: mean loss {first:.4f} (first quarter) -> {last:.4f} "
        "(last quarter)"
    )
    print(
        f"      distance to the nearest training image (RMS, 0..1): {distances['before']:.3f} before -> "
        f"{distances['after']:.3f} after"
    )
    print(f"      before/after: {comparison}")
    print(f"      checkpoint:   {result.checkpoints[-1]}")
    print(f"      loss plot:    {plot}")
    print(f"      settings:     {out / 'settings.json'} (train again: python -m dreambooth train --config that file)")
    return {
        "checkpoint": result.checkpoints[-1],
        "samples": after[0].parent,
        "before": before,
        "after": after,
        "before_after": comparison,
        "plot": plot,
        "nearest_training_distance": distances,
    }
