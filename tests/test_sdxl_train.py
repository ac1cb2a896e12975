"""SDXL training on the tiny SDXL (models/tiny.py): its conditioning as diffusers makes it, the time ids of the real
crop, a full fine-tune with prior preservation (class images from the SDXL pipeline), exact resume, cached vs
trained text encoders, v-prediction."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dreambooth.data.class_images import saved_prompt, usable_class_images
from dreambooth.models.components import load_components
from dreambooth.train.families import family_for
from dreambooth.train.loop import Trainer


def weights(module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def sdxl_settings(make_settings, tiny_checkpoint):
    """``sdxl_settings(**changes)``: make_settings on the tiny SDXL."""

    def make(**changes):
        return make_settings(pretrained_model_name_or_path=str(tiny_checkpoint("sdxl")), **changes)

    return make


# ------------------------------------------------------------------------------------------------ conditioning


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_sdxl_conditioning_is_what_diffusers_encode_prompt_makes(tiny_checkpoint, clip_skip):
    """Both encoders' hidden states at the clip_skip layer (1: the penultimate) concatenated, and the second's pooled
    projection: equal to StableDiffusionXLPipeline.encode_prompt with diffusers' clip_skip (ours minus one)."""
    components = load_components(tiny_checkpoint("sdxl"))
    family = family_for(components)
    pipe = family.pipeline(components, components.noise_scheduler)
    prompts = ["photo of zwx ring", "a dog on the beach"]
    with torch.no_grad():
        ours = family.encode(components, prompts, clip_skip)
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts,
            device=torch.device("cpu"),
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            clip_skip=None if clip_skip == 1 else clip_skip - 1,
        )
        ids = components.tokenizer_2(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        layer = components.text_encoder_2(ids, output_hidden_states=True).hidden_states[-1 - clip_skip]
    assert ours.hidden.shape == (2, 77, 32 + 64)  # CLIP-L's 32 features, then bigG's 64
    assert torch.equal(ours.hidden, embeds)
    assert torch.equal(ours.pooled, pooled) and ours.pooled.shape == (2, 64)
    assert torch.equal(ours.hidden[..., 32:], layer)  # no final layer norm on the context, as SDXL was trained


def test_sdxl_clip_skip_beyond_the_encoders_is_refused(sdxl_settings):
    from dreambooth.errors import DreamBoothError

    with pytest.raises(DreamBoothError, match="clip_skip is 4 but SDXL's text encoders have 4 layers"):
        Trainer(sdxl_settings(clip_skip=4)).run()


# ------------------------------------------------------------------------------------------------ training


@pytest.mark.slow
def test_sdxl_full_fine_tune_with_prior_preservation(sdxl_settings, tiny_checkpoint, tmp_path):
    """Two steps, both text encoders trained, class images made by the SDXL pipeline; the checkpoint loads back as
    SDXL with the trained UNet and encoders and the base VAE."""
    base = load_components(tiny_checkpoint("sdxl"))
    settings = sdxl_settings(with_prior_preservation=True, train_text_encoder=True, n_save_sample=1)
    trainer = Trainer(settings)
    result = trainer.run()
    assert result.step == 2 and all(torch.isfinite(torch.tensor([loss for _, loss in result.losses])))
    made = usable_class_images(tmp_path / "class", "photo of a ring")
    assert len(made) == 2 and all(saved_prompt(p) == "photo of a ring" for p in made)
    assert all(Image.open(p).size == (64, 64) for p in made)
    assert len(result.samples) == 1
    saved = load_components(result.checkpoints[0])
    assert saved.arch.family == "sdxl"
    for name in ("unet", "text_encoder", "text_encoder_2"):
        assert same(weights(getattr(saved, name)), weights(getattr(trainer.components, name))), name
        assert not same(weights(getattr(saved, name)), weights(getattr(base, name))), name
    assert same(weights(saved.vae), weights(base.vae))
