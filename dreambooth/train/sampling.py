"""Images from the training components in memory: samples during training, tests after saving, class images.

No disk round trip of the model: a diffusers pipeline is assembled around the live modules.  The global RNG state is
saved and restored around generation, so making a sample never changes what training does next.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from ..compat import text_final_layer_norm


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
    on_batch: Callable[[list[Any]], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
    zero_terminal_snr: bool = False,
) -> list[Any]:
    """PIL images, ``images_per_prompt`` for each prompt, in order; the k-th image of a prompt uses seed + k.

    Images are made ``batch_size`` at a time; ``on_batch`` gets each batch as soon as it is made (to keep it before
    the next is started) and ``should_stop`` is asked before each batch (True: return what was made).

    ``autocast_dtype`` (torch.float16 / bfloat16): the text encoder and UNet run under autocast in that dtype (the
    run's mixed precision); the VAE decodes in its own dtype (see :func:`decode`).  An inpainting model gets a full
    mask over a blank image (its txt2img, as in the WebUI).  ``zero_terminal_snr``: the model was trained with
    that schedule; sampling uses it too, with trailing timesteps (see train/noising.py).
    """
    import torch

    from ..models.inpainting import txt2img_inputs
    from .families import family_for

    family = family_for(components)
    unet, vae = components.unet, components.vae
    text_encoders = family.text_encoders(components)
    device = device or next(unet.parameters()).device
    pipe = family.pipeline(components, _sampling_scheduler(components, zero_terminal_snr))
    pipe.set_progress_bar_config(disable=True)
    extra = txt2img_inputs(components, resolution, resolution)
    jobs = [(prompt, k) for prompt in prompts for k in range(images_per_prompt)]
    device_type = torch.device(device).type
    images: list[Any] = []

    def autocast() -> Any:
        if autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=autocast_dtype)

    with preserved_rng(), eval_mode(unet, vae, *text_encoders), torch.no_grad():
        frozen = [vae, *text_encoders]
        devices = [next(m.parameters()).device for m in frozen]
        for module in frozen:
            module.to(device)
        try:
            dtype = next(unet.parameters()).dtype
            latent_side = resolution // pipe.vae_scale_factor
            for start in range(0, len(jobs), batch_size):
                if should_stop():
                    break
                chunk = jobs[start : start + batch_size]
                generators = [torch.Generator(device="cpu").manual_seed(seed + k) for _, k in chunk]
                shape = (vae.config.latent_channels, latent_side, latent_side)
                latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device, dtype)
                with autocast():
                    prompt_inputs = family.pipeline_inputs(
                        pipe, components, [p for p, _ in chunk], [negative_prompt] * len(chunk), clip_skip, dtype
                    )
                    denoised = pipe(
                        **prompt_inputs,
                        num_inference_steps=steps,
                        guidance_scale=guidance_scale,
                        height=resolution,
                        width=resolution,
                        latents=latents,
                        generator=generators,
                        output_type="latent",
                        **extra,
                    ).images
                decoded = decode(vae, denoised)
                batch = pipe.image_processor.postprocess(decoded.float(), output_type="pil")
                images.extend(batch)
                if on_batch is not None:
                    on_batch(batch)
        finally:
            for module, where in zip(frozen, devices):
                module.to(where)
    return images


def decode(vae: Any, latents: Any) -> Any:
    """Images in [-1, 1] from ``latents``, decoded in the VAE's dtype (the trainer holds a frozen VAE in the run's
    mixed precision: train/precision.py).  An fp16 decode that overflows (inf / NaN: some SD VAEs do, the reason for
    the WebUI's --no-half-vae) is done again with the VAE in fp32, as the WebUI does by default; fp16 -> fp32 -> fp16
    gives the same weights back."""
    import torch

    dtype = next(vae.parameters()).dtype
    decoded = vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample
    if dtype == torch.float16 and not bool(torch.isfinite(decoded).all()):
        vae.to(torch.float32)
        try:
            decoded = vae.decode(latents.float() / vae.config.scaling_factor).sample
        finally:
            vae.to(dtype)
    return decoded


def _sampling_scheduler(components: Any, zero_terminal_snr: bool = False) -> Any:
    from diffusers import DDIMScheduler

    from .noising import sampling_scheduler_options

    # An epsilon model cannot predict from pure noise (x0 = (x - eps) / 0): its samples keep its own schedule (the
    # trainer warns that zero terminal SNR needs v-prediction).
    v_prediction = components.noise_scheduler.config.prediction_type == "v_prediction"
    options = sampling_scheduler_options(zero_terminal_snr and v_prediction)
    return DDIMScheduler.from_config(components.noise_scheduler.config, **options)
