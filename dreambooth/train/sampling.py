"""Images from the training components in memory: samples during training, tests after saving, class images.

No disk round trip of the model: a diffusers pipeline is assembled around the live modules.  The global RNG state is
saved and restored around generation, so making a sample never changes what training does next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ..compat import quiet_library_notices, text_final_layer_norm


def encode_prompts(text_encoder: Any, tokenizer: Any, prompts: list[str], clip_skip: int = 1) -> Any:
    """Text-encoder hidden states for ``prompts``; ``clip_skip`` N uses the N-th last layer (then the final norm)."""
    parameter = next(text_encoder.parameters())
    ids = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(parameter.device)
    if clip_skip <= 1:
        return text_encoder(ids)[0]
    output = text_encoder(ids, output_hidden_states=True)
    return text_final_layer_norm(text_encoder)(output.hidden_states[-clip_skip])


@contextlib.contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore torch's CPU (and CUDA) RNG state afterwards."""
    import torch

    cpu = torch.random.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        torch.random.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def eval_mode(*modules: Any) -> Iterator[None]:
    was_training = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in zip(modules, was_training):
            module.train(training)


def generate(
    components: Any,
    prompts: list[str],
    negative_prompt: str = "",
    steps: int = 20,
    guidance_scale: float = 7.5,
    seed: int = 0,
    images_per_prompt: int = 1,
    resolution: int = 512,
    clip_skip: int = 1,
    batch_size: int = 4,
    device: Any = None,
    autocast_dtype: Any = None,
) -> list[Any]:
    """PIL images, ``images_per_prompt`` for each prompt, in order; the k-th image of a prompt uses seed + k."""
    import torch

    with quiet_library_notices():  # the pipeline module resolves CLIP's image processor, which we never use
        from diffusers import DDIMScheduler, StableDiffusionPipeline

    unet, vae, text_encoder = components.unet, components.vae, components.text_encoder
    device = device or next(unet.parameters()).device
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=components.tokenizer,
        unet=unet,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    jobs = [(prompt, k) for prompt in prompts for k in range(images_per_prompt)]
    images = []
    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    with preserved_rng(), eval_mode(unet, vae, text_encoder), torch.no_grad(), autocast:
        vae_device = next(vae.parameters()).device
        text_device = next(text_encoder.parameters()).device
        vae.to(device)
        text_encoder.to(device)
        try:
            for start in range(0, len(jobs), batch_size):
                chunk = jobs[start : start + batch_size]
                embeds = encode_prompts(text_encoder, components.tokenizer, [p for p, _ in chunk], clip_skip)
                negative = encode_prompts(text_encoder, components.tokenizer, [negative_prompt] * len(chunk), clip_skip)
                generators = [torch.Generator(device="cpu").manual_seed(seed + k) for _, k in chunk]
                latents = torch.stack(
                    [
                        torch.randn(
                            (
                                unet.config.in_channels,
                                resolution // pipe.vae_scale_factor,
                                resolution // pipe.vae_scale_factor,
                            ),
                            generator=g,
                        )
                        for g in generators
                    ]
                ).to(device, next(unet.parameters()).dtype)
                result = pipe(
                    prompt_embeds=embeds.to(next(unet.parameters()).dtype),
                    negative_prompt_embeds=negative.to(next(unet.parameters()).dtype),
                    num_inference_steps=steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    latents=latents,
                )
                images.extend(result.images)
        finally:
            vae.to(vae_device)
            text_encoder.to(text_device)
    return images
