"""Inpainting models (9-channel UNet) train with random masks and make images through the inpainting pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from dreambooth.data.dataset import mix_seed
from dreambooth.data.masks import mask_tensor, random_mask
from dreambooth.events import Callbacks, Commands
from dreambooth.models.components import load_components
from dreambooth.train.loop import Trainer


def unet_weights(components) -> dict:
    return {k: v.detach().clone() for k, v in components.unet.state_dict().items()}


@pytest.fixture
def inpainting(make_settings, tiny_checkpoint):
    def make(**changes):
        return make_settings(pretrained_model_name_or_path=str(tiny_checkpoint("sd1-inpainting")), **changes)

    return make


def record_unet_inputs(unet) -> list:
    inputs = []
    unet.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach().clone()))
    return inputs


# ------------------------------------------------------------------------------------------------------ masks


def test_masks_are_deterministic_and_include_full_masks_at_the_configured_share():
    first = [np.asarray(random_mask(64, 48, seed, 0.25)) for seed in range(400)]
    again = [np.asarray(random_mask(64, 48, seed, 0.25)) for seed in range(400)]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(m.shape == (48, 64) and set(np.unique(m)) <= {0, 255} for m in first)
    full = [m.min() == 255 for m in first]
    assert 0.19 < sum(full) / len(full) < 0.31
    partial = [m for m in first if m.min() < 255]
    assert all(m.max() == 255 for m in partial)  # never an empty mask
    assert len({m.tobytes() for m in partial}) == len(partial)  # each sample its own mask
    coverage = [float((m == 255).mean()) for m in partial]
    assert min(coverage) < 0.2 and max(coverage) > 0.5  # small strokes as well as large areas
    assert not any(np.asarray(random_mask(32, 32, seed, 0.0)).min() == 255 for seed in range(100))
    assert all(np.asarray(random_mask(32, 32, seed, 1.0)).min() == 255 for seed in range(20))


# ------------------------------------------------------------------------------------------------------ training


@pytest.mark.slow
@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"with_prior_preservation": True},
        {
            "use_aspect_ratio_bucket": True,
            "aspect_buckets": "64x64,128x64",
            "with_prior_preservation": True,
            "cache_latents": False,
        },
    ],
    ids=["plain", "prior", "buckets-prior-uncached"],
)
def test_an_inpainting_model_trains(inpainting, changes):
    settings = inpainting(n_save_sample=1, **changes)
    components = load_components(settings.pretrained_model_name_or_path)
    shapes = record_unet_inputs(components.unet)
    before = unet_weights(components)
    trainer = Trainer(settings, components=components)
    result = trainer.run()
    assert result.step == 2 and not result.cancelled
    assert result.samples and result.samples[0].is_file()
    assert {x.shape[1] for x in shapes} == {9}
    after = unet_weights(trainer.components)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    if changes.get("use_aspect_ratio_bucket"):
        # the 96x64 instance images in the 128x64 bucket, the generated class images in 64x64
        assert {tuple(x.shape[2:]) for x in shapes} >= {(8, 16), (8, 8)}


@pytest.mark.slow
def test_unet_input_is_noisy_latents_then_mask_then_masked_image_latents(inpainting, tmp_path):
    """The 9 channels, recomputed independently: the sample's mask at latent size, and the VAE's latents of the
    image with the masked area removed (zeros, as diffusers' pipeline does)."""
    folder = tmp_path / "one"
    folder.mkdir()
    picture = Image.new("RGB", (64, 64), (30, 120, 200))
    ImageDraw.Draw(picture).ellipse((10, 12, 40, 44), fill=(220, 20, 30))
    picture.save(folder / "only.png")
    for ratio in (0.0, 1.0):
        settings = inpainting(
            output_dir=str(tmp_path / f"out{ratio}"),
            max_train_steps=1,
            inpainting_full_mask_ratio=ratio,
            concept={"instance_data_dir": str(folder)},
        )
        components = load_components(settings.pretrained_model_name_or_path)
        inputs = record_unet_inputs(components.unet)
        Trainer(settings, components=components).run()
        unet_input = inputs[0]
        assert unet_input.shape == (1, 9, 8, 8)
        mask = mask_tensor(random_mask(64, 64, mix_seed(settings.seed, "mask", 0, "instance"), ratio))
        assert (mask.min() == 1) == (ratio == 1.0)
        pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)
        masked = pixels * (mask < 0.5)
        with torch.no_grad():
            expected = components.vae.encode(masked[None]).latent_dist.mean * components.vae.config.scaling_factor
        torch.testing.assert_close(unet_input[0, 4], mask[0, ::8, ::8], rtol=0, atol=0)
        torch.testing.assert_close(unet_input[:, 5:], expected, rtol=1e-5, atol=1e-5)
        if ratio == 0.0:  # the masked image differs from the whole one: its latents too
            with torch.no_grad():
                whole = components.vae.encode(pixels[None]).latent_dist.mean * components.vae.config.scaling_factor
            assert not torch.allclose(unet_input[:, 5:], whole, atol=1e-3)


@pytest.mark.slow
def test_resume_of_an_inpainting_run_is_exact(inpainting, tmp_path):
    common = {"max_train_steps": 4, "with_prior_preservation": True, "hflip": True}
    straight = Trainer(inpainting(output_dir=str(tmp_path / "straight"), **common))
    straight.run()

    commands = Commands()

    class CancelAtTwo(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == 2:
                commands.cancel()

    first = Trainer(inpainting(output_dir=str(tmp_path / "split"), **common), CancelAtTwo(), commands)
    interrupted = first.run()
    assert interrupted.cancelled and interrupted.step == 2
    resumed = Trainer(inpainting(output_dir=str(tmp_path / "split"), resume_from=str(interrupted.state_dir), **common))
    assert resumed.run().step == 4
    a, b = unet_weights(straight.components), unet_weights(resumed.components)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------------ images


def test_images_of_an_inpainting_model_use_a_full_mask_and_a_blank_image(tiny_checkpoint):
    """The WebUI's txt2img for inpainting models: mask of ones, latents of an all-grey (0 in [-1, 1]) image."""
    from dreambooth.train.sampling import generate

    components = load_components(tiny_checkpoint("sd1-inpainting"))
    inputs = record_unet_inputs(components.unet)
    images = generate(components, ["photo of a ring"], steps=2, images_per_prompt=3, resolution=64, batch_size=2)
    assert len(images) == 3 and images[0].size == (64, 64)
    with torch.no_grad():
        blank = components.vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    blank = blank * components.vae.config.scaling_factor
    assert [x.shape[0] for x in inputs] == [4, 4, 2, 2]  # batches of 2 and 1, with and without the prompt
    for unet_input in inputs:
        assert unet_input.shape[1:] == (9, 8, 8)
        assert torch.equal(unet_input[:, 4], torch.ones_like(unet_input[:, 4]))
        torch.testing.assert_close(unet_input[:, 5:], blank.expand(len(unet_input), -1, -1, -1))


@pytest.mark.slow
def test_trained_inpainting_model_loads_as_an_inpainting_pipeline(inpainting, tmp_path):
    import yaml
    from diffusers import StableDiffusionInpaintPipeline

    from dreambooth.models.components import save_diffusers_folder
    from dreambooth.models.files import read_state_dict

    trainer = Trainer(inpainting())
    checkpoint = trainer.run().checkpoints[-1]
    sidecar = checkpoint.with_suffix(".yaml")
    config = yaml.safe_load(sidecar.read_text())
    assert config["model"]["target"] == "ldm.models.diffusion.ddpm.LatentInpaintDiffusion"
    assert config["model"]["params"]["conditioning_key"] == "hybrid"
    assert config["model"]["params"]["unet_config"]["params"]["in_channels"] == 9
    # what the WebUI looks at to choose an inpainting config
    assert read_state_dict(checkpoint)[0]["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    pipe = StableDiffusionInpaintPipeline.from_single_file(
        str(checkpoint),
        original_config=str(sidecar),
        config=str(save_diffusers_folder(load_components(checkpoint), tmp_path / "config")),
        local_files_only=True,
        safety_checker=None,
    )
    assert pipe.unet.config.in_channels == 9
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 9, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([20, 700])
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.unet(x, t, encoder_hidden_states=context).sample,
            trainer.components.unet(x, t, encoder_hidden_states=context).sample,
            rtol=0,
            atol=1e-6,
        )
