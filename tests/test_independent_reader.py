"""A file we write, read by diffusers' own ``from_single_file``, computes what our components compute."""

from __future__ import annotations

import pytest
import torch

from dreambooth.models.components import load_components, save_diffusers_folder, save_single_file


@pytest.mark.parametrize("variant", ["sd1", "sd2-v", "sd2-eps"])
def test_diffusers_from_single_file_matches_our_components(tiny_checkpoint, tmp_path, variant):
    from diffusers import StableDiffusionPipeline

    ours = load_components(tiny_checkpoint(variant))
    # Change the weights so the file under test is one we wrote, not the fixture.
    with torch.no_grad():
        for module in (ours.unet, ours.vae, ours.text_encoder):
            for parameter in module.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
    written = save_single_file(ours, tmp_path / "model.safetensors", sidecar=True)
    config_folder = save_diffusers_folder(ours, tmp_path / "configs")
    pipe = StableDiffusionPipeline.from_single_file(
        str(written[0]),
        original_config=str(written[1]),
        config=str(config_folder),
        local_files_only=True,
        safety_checker=None,
    )
    assert pipe.scheduler.config.prediction_type == ours.arch.prediction_type
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, ours.arch.unet["cross_attention_dim"], generator=generator)
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    ids = ours.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        for t in (torch.tensor([10, 990]), torch.tensor([500, 500])):
            a = ours.unet(latents, t, encoder_hidden_states=context).sample
            b = pipe.unet(latents, t, encoder_hidden_states=context).sample
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            ours.vae.encode(image).latent_dist.mean,
            pipe.vae.encode(image).latent_dist.mean,
            rtol=0,
            atol=1e-6,
        )
        torch.testing.assert_close(ours.vae.decode(latents).sample, pipe.vae.decode(latents).sample, rtol=0, atol=1e-6)
        torch.testing.assert_close(ours.text_encoder(ids)[0], pipe.text_encoder(ids)[0], rtol=0, atol=1e-6)
