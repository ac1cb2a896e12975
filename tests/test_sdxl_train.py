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
        return make_settings(**{"pretrained_model_name_or_path": str(tiny_checkpoint("sdxl")), **changes})

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


@pytest.mark.slow
def test_text_encoder_2_learning_rate_is_its_own_or_freezes_it(sdxl_settings, tmp_path):
    """One step with both encoders trained: text_encoder_2_learning_rate changes the second encoder's update only
    (the first's gradient of step 1 does not depend on it; no clipping, whose norm counts both); 0 leaves the
    second encoder as it was."""
    base = load_components(sdxl_settings().pretrained_model_name_or_path)

    def run(name, **changes):
        trainer = Trainer(
            sdxl_settings(
                output_dir=str(tmp_path / name),
                train_text_encoder=True,
                max_train_steps=1,
                max_grad_norm=0.0,
                save_training_state=False,
                **changes,
            )
        )
        trainer.run()
        return weights(trainer.components.text_encoder), weights(trainer.components.text_encoder_2)

    first, second = run("same")
    first_own, second_own = run("own", text_encoder_2_learning_rate=1e-2)
    first_frozen, second_frozen = run("frozen", text_encoder_2_learning_rate=0.0)
    assert same(first, first_own) and same(first, first_frozen)
    assert not same(second, second_own) and not same(second, weights(base.text_encoder_2))
    assert same(second_frozen, weights(base.text_encoder_2))


# ------------------------------------------------------------------------------------------------ time ids


class Recording(Trainer):
    """The trainer, recording every crop it takes and the time ids its UNet is given."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.taken, self.time_ids = [], []

    def _load(self, device):
        components = super()._load(device)
        forward = components.unet.forward

        def recording_forward(sample, timestep, **kwargs):
            self.time_ids.extend(tuple(int(v) for v in row) for row in kwargs["added_cond_kwargs"]["time_ids"])
            return forward(sample, timestep, **kwargs)

        components.unet.forward = recording_forward
        return components

    def _crop(self, example, flip, sample_index, epoch):
        crop = super()._crop(example, flip, sample_index, epoch)
        self.taken.append((example, flip, sample_index, epoch, crop))
        return crop


def expected_pixels(path, crop, flip):
    """The pixels a crop describes, cut with PIL alone: the image scaled to ``resized``, the box at (top, left) of
    the flipped image when flipped."""
    import numpy as np

    image = Image.open(path).convert("RGB")
    height, width = crop.resized
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    target_h, target_w = crop.target
    image = image.crop((crop.left, crop.top, crop.left + target_w, crop.top + target_h))
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)


@pytest.mark.parametrize("cache_latents", [True, False], ids=["cached", "uncached"])
def test_sdxl_time_ids_are_the_crop_actually_taken(sdxl_settings, tmp_path, cache_latents):
    """ARB and a random crop (and flips): the UNet's time ids of each sample are (original size, crop top-left,
    target size) of the pixels its latent was made from, checked against the image cut with PIL alone."""
    from conftest import draw_subject

    folder = tmp_path / "mixed"
    for index, size in enumerate([(120, 64), (136, 64), (64, 120), (100, 70)]):
        draw_subject(folder / str(index), count=1, size=size, seed=index)
    settings = sdxl_settings(
        concept={"instance_data_dir": str(folder)},
        use_aspect_ratio_bucket=True,
        aspect_buckets="96x64 64x96 64x64",
        center_crop=False,
        hflip=True,
        cache_latents=cache_latents,
        max_train_steps=3,
        save_training_state=False,
    )
    trainer = Recording(settings)
    trainer.run()
    assert sorted(trainer.time_ids) == sorted(crop.time_ids() for *_, crop in trainer.taken)
    assert len(trainer.time_ids) == 3
    for example, flip, index, epoch, crop in trainer.taken:
        image = Image.open(example.path)
        bucket = trainer.bucket_of[example.path]
        assert crop.original == (image.height, image.width)
        assert crop.target == (bucket.height, bucket.width)
        assert torch.equal(trainer._pixels(example, flip, index, epoch), expected_pixels(example.path, crop, flip))
    assert any(crop.left or crop.top for *_, crop in trainer.taken)  # a random crop, not only the corner


def test_a_flipped_crop_describes_the_flipped_pixels(tmp_path):
    """With a flip, the crop's left edge is measured in the flipped image: the pixels are that box of it."""
    from conftest import draw_subject

    from dreambooth.data.cache import pixels_and_crop

    path = draw_subject(tmp_path, count=1, size=(136, 64))[0]
    _, unflipped = pixels_and_crop(path, (96, 64), False, False, 3)
    image, crop = pixels_and_crop(path, (96, 64), False, True, 3)
    assert unflipped.left != (136 - 96) // 2  # not the centre, where a flip changes nothing
    assert crop.resized == (64, 136) and crop.left == 136 - 96 - unflipped.left and crop.top == 0
    assert torch.equal(image, expected_pixels(path, crop, True))


def test_cached_latents_remember_their_crop(tmp_path, monkeypatch):
    """A second run reads the crop with the latent from the disk cache, without decoding the image again."""
    from conftest import draw_subject

    from dreambooth.data import cache as cache_module
    from dreambooth.data.cache import ContentHashes, LatentCache
    from dreambooth.models.tiny import tiny_architecture, tiny_components

    path = draw_subject(tmp_path / "images", count=1, size=(120, 64))[0]
    vae = tiny_components(tiny_architecture("sdxl")).vae

    def cache():
        return LatentCache(ContentHashes(), vae, 64, False, 7, tmp_path / "cache")

    first = cache()
    first.get(path, True, (96, 64))
    crop = first.crop(path, True, (96, 64))
    second = cache()
    second.get(path, True, (96, 64))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the crop was recomputed")

    monkeypatch.setattr(cache_module, "crop_of", no_decoding)
    assert second.crop(path, True, (96, 64)) == crop
    assert crop.time_ids()[:2] == (64, 120) and crop.target == (64, 96)


# ------------------------------------------------------------------------------------------------ runs


@pytest.mark.slow
def test_sdxl_resume_after_cancel_gives_the_same_weights(sdxl_settings, tmp_path):
    """Exact resume on the CPU: both text encoders trained, flips, accumulation; cancelled at step 2 of 4 and
    resumed, bit for bit the weights of the straight run."""
    from dreambooth.events import Callbacks, Commands

    common = {"max_train_steps": 4, "hflip": True, "gradient_accumulation_steps": 2, "train_text_encoder": True}
    straight = Trainer(sdxl_settings(output_dir=str(tmp_path / "straight"), **common))
    straight.run()

    class CancelAtTwo(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == 2:
                commands.cancel()

    commands = Commands()
    interrupted = Trainer(
        sdxl_settings(output_dir=str(tmp_path / "split"), **common), callbacks=CancelAtTwo(), commands=commands
    ).run()
    assert interrupted.cancelled and interrupted.step == 2
    resumed = Trainer(
        sdxl_settings(output_dir=str(tmp_path / "split"), resume_from=str(interrupted.state_dir), **common)
    )
    assert resumed.run().step == 4
    for name in ("unet", "text_encoder", "text_encoder_2"):
        a, b = getattr(straight.components, name), getattr(resumed.components, name)
        assert same(weights(a), weights(b)), name


@pytest.mark.slow
def test_sdxl_cached_and_trained_text_encoders_give_the_same_first_loss(sdxl_settings, tmp_path):
    """The cached embeddings of the frozen encoders (both, pooled too) are what the trained encoders compute before
    their first update: the first step's loss is the same."""
    losses = []
    for name, train in (("cached", False), ("trained", True)):
        settings = sdxl_settings(
            output_dir=str(tmp_path / name), train_text_encoder=train, max_train_steps=1, save_training_state=False
        )
        trainer = Trainer(settings)
        losses.append(trainer.run().losses[0][1])
        if not train:
            assert trainer.text_cache and set(trainer.pooled_cache) == set(trainer.text_cache)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=0)


def test_sdxl_vae_stays_fp32_unless_a_separate_vae_is_given(sdxl_settings, tiny_checkpoint, tmp_path, make_settings):
    """bf16 mixed precision: SD's frozen VAE works in bf16, SDXL's own in fp32 (it overflows in half precision); a
    separate VAE (e.g. the fp16-fixed SDXL VAE) takes the run's dtype."""
    from dreambooth.models.components import save_single_file

    cpu = torch.device("cpu")
    sdxl = load_components(tiny_checkpoint("sdxl"))
    placement = Trainer(sdxl_settings(mixed_precision="bf16")).frozen_placement(sdxl, cpu)
    assert placement["vae"].dtype == torch.float32
    assert placement["text_encoder"].dtype == placement["text_encoder_2"].dtype == torch.bfloat16
    vae_file = save_single_file(sdxl, tmp_path / "vae.safetensors")[0]
    given = sdxl_settings(mixed_precision="bf16", pretrained_vae_name_or_path=str(vae_file))
    assert Trainer(given).frozen_placement(sdxl, cpu)["vae"].dtype == torch.bfloat16
    sd = load_components(tiny_checkpoint("sd1"))
    assert Trainer(make_settings(mixed_precision="bf16")).frozen_placement(sd, cpu)["vae"].dtype == torch.bfloat16


@pytest.mark.slow
def test_sdxl_v_prediction_trains_and_stays_v(sdxl_settings, tmp_path, monkeypatch):
    """A v-prediction SDXL (its yaml's VScaling): the run trains against v and the output is v-prediction again, for
    our loader and in its sidecar yaml."""
    from dreambooth.models.files import read_yaml, sidecar_yaml_path
    from dreambooth.models.tiny import write_tiny_checkpoint
    from dreambooth.train import loop

    base = write_tiny_checkpoint(tmp_path / "models", family="sdxl", prediction_type="v_prediction", name="tiny-xl-v")
    targets = []
    training_target = loop.training_target

    def recording_target(scheduler, latents, noise, timesteps):
        target = training_target(scheduler, latents, noise, timesteps)
        targets.append(torch.equal(target, scheduler.get_velocity(latents, noise, timesteps)))
        return target

    monkeypatch.setattr(loop, "training_target", recording_target)
    result = Trainer(sdxl_settings(pretrained_model_name_or_path=str(base), save_training_state=False)).run()
    assert targets and all(targets)
    saved = load_components(result.checkpoints[0])
    assert saved.arch.family == "sdxl" and saved.arch.prediction_type == "v_prediction"
    yaml = read_yaml(sidecar_yaml_path(result.checkpoints[0]))
    assert yaml["model"]["params"]["denoiser_config"]["params"]["scaling_config"]["target"].endswith("VScaling")


@pytest.mark.slow
def test_trained_sdxl_file_loads_in_diffusers_and_our_loader(sdxl_settings, tmp_path):
    """The trained single file (sgm layout + sidecar yaml) loads back with our loader, converts to a diffusers folder
    and back, and diffusers' StableDiffusionXLPipeline.from_single_file (our folder as its local config) computes
    what the trained UNet computes."""
    from diffusers import StableDiffusionXLPipeline

    from dreambooth.models.components import save_diffusers_folder

    trainer = Trainer(sdxl_settings(save_training_state=False))
    checkpoint = trainer.run().checkpoints[0]
    assert checkpoint.with_suffix(".yaml").is_file()  # a non-standard size: the WebUI needs sd_xl_base.yaml's sizes
    ours = load_components(checkpoint)
    assert same(weights(ours.unet), weights(trainer.components.unet))
    folder = save_diffusers_folder(ours, tmp_path / "folder")
    assert same(weights(load_components(folder).unet), weights(ours.unet))
    pipe = StableDiffusionXLPipeline.from_single_file(str(checkpoint), config=str(folder), local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, 96, generator=generator)
    added = {
        "text_embeds": torch.randn(1, 64, generator=generator),
        "time_ids": torch.tensor([[96.0, 64, 8, 0, 64, 64]]),
    }
    with torch.no_grad():
        a = ours.unet(latents, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample
        b = pipe.unet(latents, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_sdxl_buckets_are_the_guide_list_at_1024():
    """SDXL's default resolution is 1024: the guide's rule at 1024 (sides 512 to 2048 in 64-px steps, the tallest
    within 1024² pixels for each width) gives the sizes SDXL was trained on."""
    from dreambooth.data.buckets import generate_buckets
    from dreambooth.models.tiny import tiny_architecture

    family = family_for(tiny_architecture("sdxl"))
    assert family.default_resolution == 1024 and family_for(tiny_architecture("sd1")).default_resolution == 512
    buckets = generate_buckets(family.default_resolution)
    sizes = {(b.width, b.height) for b in buckets}
    sdxl_trained = [(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640)]
    assert {s for w, h in sdxl_trained for s in ((w, h), (h, w))} <= sizes
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 1024**2 and min(w, h) >= 512 for w, h in sizes)
    assert max(max(size) for size in sizes) == 2048
