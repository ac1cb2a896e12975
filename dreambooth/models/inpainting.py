"""Inpainting models (SD 1.x / 2.x with a 9-channel UNet): what they add to training and to image generation.

The UNet's input is ``cat([noisy latents (4), mask (1), masked-image latents (4)], dim=1)``, the order of diffusers'
``StableDiffusionInpaintPipeline`` and of ldm's ``LatentInpaintDiffusion`` (``hybrid`` conditioning: the mask and the
masked image's latents are concatenated to the noisy latents).

Training (the recipe the released inpainting models were trained with): each sample gets a random mask
(:mod:`..data.masks`: rectangles, brush strokes, and a share of full masks), the image with the masked area removed
(``pixels * (mask < 0.5)``, as the pipeline does) is encoded by the VAE, and the mask is downsampled to the latent
grid (nearest, as the pipeline does).  The loss is the usual one over the whole latent.

Cost: the masked-image latents cannot be cached (a new random mask each time), so every partly masked sample costs
one VAE encode per step, as training without the latent cache does; the image's own latent still comes from the
cache.  A full mask leaves a blank image whose latent depends only on the size: it is encoded once per size.  The
encode uses the VAE posterior's mean (deterministic: resume stays exact; the posterior's spread is tiny).

Images: an inpainting model makes a txt2img image from a mask of ones over a blank image (what the WebUI's txt2img
passes to such a model: a full mask and the latents of an all-grey image, 0 in [-1, 1]); the pipeline here gets the
same, with the blank image's latents computed as in training.
"""

from __future__ import annotations

from typing import Any

MASK_CHANNELS = 1


def is_inpainting(components: Any) -> bool:
    """Whether the components are an inpainting model (a 9-channel UNet input)."""
    return bool(components.arch.is_inpainting)


def unet_input(noisy_latents: Any, conditioning: Any) -> Any:
    """The UNet's input: the noisy latents, then the mask, then the masked-image latents, on the channel axis."""
    import torch

    return torch.cat([noisy_latents, conditioning.to(noisy_latents)], dim=1)


class InpaintingInputs:
    """What a training step of an inpainting model adds: a random mask per sample and the UNet's extra channels."""

    unet_input = staticmethod(unet_input)

    def __init__(self, vae: Any, full_mask_ratio: float):
        """``full_mask_ratio``: the share of samples whose whole image is masked (0 to 1)."""
        self.vae = vae
        self.full_mask_ratio = full_mask_ratio
        self._blank: dict[tuple[int, int], Any] = {}  # (H, W) -> latents of a fully masked (blank) image

    def mask(self, image: Any, seed: int) -> Any:
        """The (1, H, W) mask of a (3, H, W) image, 1 where to paint, drawn from ``seed``."""
        from ..data.masks import mask_tensor, random_mask

        height, width = image.shape[-2:]
        return mask_tensor(random_mask(width, height, seed, self.full_mask_ratio))

    def _encode(self, images: Any) -> Any:
        import torch

        parameter = next(self.vae.parameters())
        with torch.no_grad():
            mean = self.vae.encode(images.to(parameter.device, parameter.dtype)).latent_dist.mean
        return mean.float() * self.vae.config.scaling_factor

    def conditioning(self, images: Any, masks: Any) -> Any:
        """``images`` (B, 3, H, W) in [-1, 1], ``masks`` (B, 1, H, W), 1 where to paint -> (B, 5, H/8, W/8), fp32
        on the VAE's device: channel 0 the mask, channels 1-4 the masked image's latents."""
        import torch

        masked = images * (masks < 0.5)
        full = masks.flatten(1).amin(dim=1) >= 0.5
        size = tuple(images.shape[-2:])
        latents = [None] * len(images)
        partial = [i for i in range(len(images)) if not full[i]]
        if partial:
            encoded = self._encode(masked[partial])
            for row, index in enumerate(partial):
                latents[index] = encoded[row]
        if bool(full.any()):
            if size not in self._blank:
                self._blank[size] = self._encode(torch.zeros(1, *images.shape[1:]))[0]
            for index in range(len(images)):
                if full[index]:
                    latents[index] = self._blank[size]
        stacked = torch.stack(latents)
        small = torch.nn.functional.interpolate(masks.float(), size=stacked.shape[-2:]).to(stacked.device)
        return torch.cat([small, stacked], dim=1)


def pipeline_class(components: Any) -> Any:
    """The diffusers pipeline that makes images with these components."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    return StableDiffusionInpaintPipeline if is_inpainting(components) else StableDiffusionPipeline


def txt2img_inputs(components: Any, width: int, height: int) -> dict[str, Any]:
    """Extra pipeline arguments that make a text-to-image call: for inpainting, a full mask and the latents of a
    blank image (the VAE posterior's mean, as in training; the image itself is then unused); else none."""
    if not is_inpainting(components):
        return {}
    import torch
    from PIL import Image

    vae = components.vae
    parameter = next(vae.parameters())
    with torch.no_grad():
        blank = torch.zeros(1, 3, height, width, device=parameter.device, dtype=parameter.dtype)
        latents = vae.encode(blank).latent_dist.mean * vae.config.scaling_factor
    return {
        "image": Image.new("RGB", (width, height)),
        "mask_image": Image.new("L", (width, height), 255),
        "masked_image_latents": latents,
    }
