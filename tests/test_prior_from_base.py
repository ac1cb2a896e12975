"""prior_from_base_model: the base model's own predictions on the class prompt are the prior, with no class image."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

from dreambooth.models.components import load_components
from dreambooth.settings import Settings
from dreambooth.train.loop import Trainer

PRETRAIN_STEPS = 300


def draw_class_images(folder, count=4):
    """The class looks unlike the instance: green squares on grey (as in test_trainer's prior-preservation test)."""
    from PIL import Image, ImageDraw

    folder.mkdir()
    for index in range(count):
        image = Image.new("RGB", (64, 64), (120, 120, 120))
        ImageDraw.Draw(image).rectangle((8 + 6 * index, 10, 40 + 6 * index, 42), fill=(30, 200, 60))
        image.save(folder / f"class_{index}.png")


def class_drift(base_file, class_dir, trainers):
    """The mean squared difference from the base model's predictions for the class prompt on class-image latents:
    tests/test_trainer.py::test_prior_preservation_keeps_class_predictions_closer_to_the_base's measure."""
    from dreambooth.data.cache import pixels
    from dreambooth.train.sampling import encode_prompts

    base = load_components(base_file)
    generator = torch.Generator().manual_seed(0)
    images = torch.stack([pixels(p, 64, True, False, 0) for p in sorted(class_dir.glob("*.png"))])
    with torch.no_grad():
        latents = base.vae.encode(images).latent_dist.mean * base.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(100, 900, (len(latents),), generator=generator)
        noisy = base.noise_scheduler.add_noise(latents, noise, timesteps)
        context = encode_prompts(base.text_encoder, base.tokenizer, ["photo of a ring"] * len(latents))

        def predict(unet):
            return unet(noisy, timesteps, encoder_hidden_states=context).sample

        reference = predict(base.unet)
        return [(predict(t.components.unet) - reference).pow(2).mean().item() for t in trainers]


@pytest.mark.slow
def test_prior_from_base_model_keeps_class_predictions_closer_to_the_base_without_class_images(make_settings, tmp_path):
    """A base that knows the class, then DreamBooth with the base model's prior and without any prior, same seed and
    steps: the class prompt's predictions drift less from the base with it, and no class image is written."""
    class_dir = tmp_path / "class-images"
    draw_class_images(class_dir)
    pretrain = Trainer(
        make_settings(
            output_dir=str(tmp_path / "base"),
            max_train_steps=PRETRAIN_STEPS,
            learning_rate=5e-4,
            center_crop=True,
            concept={"instance_data_dir": str(class_dir), "instance_prompt": "photo of a ring"},
        )
    )
    base_file = pretrain.run().checkpoints[-1]
    common = {
        "pretrained_model_name_or_path": str(base_file),
        "max_train_steps": 100,
        "learning_rate": 5e-4,
        "center_crop": True,
    }
    with_prior = Trainer(
        make_settings(
            output_dir=str(tmp_path / "prior"),
            prior_from_base_model=True,
            concept={"class_data_dir": ""},
            **common,
        )
    )
    without = Trainer(make_settings(output_dir=str(tmp_path / "no-prior"), **common))
    with_prior.run()
    without.run()
    images = sorted(tmp_path.rglob("*.png"))
    assert images and all(p.parent in (class_dir, tmp_path / "instance") for p in images)  # no class image made
    drift_with, drift_without = class_drift(base_file, class_dir, [with_prior, without])
    assert drift_with < 0.9 * drift_without  # measured: about 0.38 of it


def test_with_lora_the_target_is_the_base_model_with_the_adapter_off(make_settings):
    """One more forward pass with the adapter taken off: its prediction equals the base UNet's exactly, differs from
    the adapted UNet's, and the adapter is on again afterwards."""
    trainer = Trainer(
        make_settings(training_method="lora", prior_from_base_model=True, max_train_steps=3, network_unet_lr=1e-2)
    )
    result = trainer.run()
    assert result.losses and trainer.prior.unet is None  # no copy of the UNet with an adapter
    unet, network = trainer.components.unet.eval(), trainer.method.network
    generator = torch.Generator().manual_seed(1)
    noisy = torch.randn((2, 4, 8, 8), generator=generator)
    timesteps = torch.tensor([100, 700])
    prompt = "photo of a ring"
    hidden = trainer.prior.embeddings[prompt].hidden.expand(2, -1, -1)
    with torch.no_grad():
        base = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
        network.apply()
        try:
            adapted = unet(noisy, timesteps, encoder_hidden_states=hidden).sample
            target = trainer.prior.predict(noisy, timesteps, [prompt, prompt], contextlib.nullcontext())
            assert network.is_applied
        finally:
            network.restore()
    assert torch.equal(target, base)
    assert not torch.allclose(adapted, base)


def test_the_prior_term_is_weighted_and_the_class_prompt_is_the_base_models(make_settings):
    """The reported prior loss is the mean squared difference from the base model's prediction (0 at the first step,
    where the model is the base), the total instance + weight x prior."""
    from dreambooth.events import Callbacks

    class Losses(Callbacks):
        def __init__(self):
            self.values = []

        def on_progress(self, progress):
            if progress.phase == "training":
                self.values.append((progress.loss, progress.instance_loss, progress.prior_loss))

    losses = Losses()
    settings = make_settings(training_method="lora", prior_from_base_model=True, prior_loss_weight=3.0)
    trainer = Trainer(settings, callbacks=losses)
    trainer.run()
    (_, _, prior1), (total2, instance2, prior2) = losses.values
    # the adapter starts at zero: the trained model is the base model (up to the rounding of another batch size)
    assert prior1 < 1e-9 < prior2
    assert total2 == pytest.approx(instance2 + 3.0 * prior2, rel=1e-6)
    assert set(trainer.prior.prompts.values()) == {"photo of a ring"}


def test_full_fine_tuning_keeps_a_half_precision_copy_of_the_base_unet(make_settings):
    trainer = Trainer(make_settings(prior_from_base_model=True))
    trainer.run()
    base = load_components(trainer.settings.pretrained_model_name_or_path).unet.state_dict()
    copy = trainer.prior.unet.state_dict()
    assert all(v.dtype == torch.bfloat16 for v in copy.values() if v.is_floating_point())  # the CPU's half
    assert all(torch.equal(copy[k], base[k].bfloat16()) for k in base)


def test_settings_need_a_class_prompt_but_no_class_folder():
    def problems(class_prompt="", **changes):
        concept = {"instance_data_dir": "x", "instance_prompt": "zwx", "class_data_dir": ""}
        concept["class_prompt"] = class_prompt
        settings = Settings.from_dict({"concepts": [concept], **changes})
        return [p for p in settings.validate(check_files=False) if "class" in p]

    assert problems("a dog", prior_from_base_model=True) == []
    assert problems(prior_from_base_model=True) == [
        "concept 1: prior_from_base_model needs a class_prompt (e.g. 'photo of a dog'): the base model's prediction "
        "for it is the prior"
    ]
    both = problems(with_prior_preservation=True, prior_from_base_model=True)
    assert any(p.startswith("prior_from_base_model and with_prior_preservation are two kinds") for p in both)


def test_the_memory_estimate_counts_the_base_unet_copy_of_a_full_fine_tune():
    from dreambooth.bench import bench_architecture
    from dreambooth.memory.estimate import estimate
    from dreambooth.models.components import _on_meta, build_unet

    arch = bench_architecture("bench-tiny")
    settings = Settings(pretrained_model_name_or_path="x", resolution=64, prior_from_base_model=True)
    breakdown = estimate(settings, arch).breakdown
    unet = _on_meta(lambda: build_unet(arch))
    # fp16 on a GPU with mixed precision off: each tensor of the UNet in 2 bytes (in the allocator's 512-byte blocks)
    half = sum(-(-t.numel() * 2 // 512) * 512 for t in [*unet.parameters(), *unet.buffers()])
    assert breakdown["base model for the prior"] == half
    lora = estimate(dataclasses.replace(settings, training_method="lora"), arch)
    assert "base model for the prior" not in lora.breakdown  # the adapter's frozen UNet is the base model
