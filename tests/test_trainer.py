"""The training run end to end on the tiny model: outputs, learning, determinism, resume, placement, commands."""

from __future__ import annotations

import torch

from dreambooth.events import Callbacks, Commands
from dreambooth.models.components import load_components
from dreambooth.train.loop import Trainer


def unet_weights(components) -> dict:
    return {k: v.detach().clone() for k, v in components.unet.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


def test_two_step_training_writes_a_checkpoint_that_loads_everywhere(make_settings, tmp_path):
    from diffusers import StableDiffusionPipeline

    from dreambooth.models.components import save_diffusers_folder

    result = Trainer(make_settings()).run()
    assert result.step == 2 and not result.cancelled
    checkpoint = result.checkpoints[-1]
    assert checkpoint.name == "dreambooth_2.safetensors" and checkpoint.with_suffix(".yaml").is_file()
    ours = load_components(checkpoint)
    config = save_diffusers_folder(ours, tmp_path / "config")
    pipe = StableDiffusionPipeline.from_single_file(
        str(checkpoint),
        original_config=str(checkpoint.with_suffix(".yaml")),
        config=str(config),
        local_files_only=True,
        safety_checker=None,
    )
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            pipe.unet(x, t, encoder_hidden_states=context).sample,
            ours.unet(x, t, encoder_hidden_states=context).sample,
            rtol=0,
            atol=1e-6,
        )


def test_instance_loss_falls(make_settings):
    result = Trainer(make_settings(max_train_steps=40, learning_rate=3e-4, center_crop=True)).run()
    losses = [loss for _, loss in result.losses]
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10


PRETRAIN_STEPS = 300


def test_prior_preservation_keeps_class_predictions_closer_to_the_base(make_settings, tmp_path):
    """A base that knows the class, then DreamBooth with and without prior preservation, same seed and steps.

    Predictions for the class prompt on class-image latents drift less from the base with prior preservation.
    """
    from PIL import Image, ImageDraw

    from dreambooth.data.cache import pixels
    from dreambooth.train.sampling import encode_prompts

    class_dir = tmp_path / "class-images"
    class_dir.mkdir()
    for index in range(4):  # the class looks unlike the instance: green squares on grey
        image = Image.new("RGB", (64, 64), (120, 120, 120))
        ImageDraw.Draw(image).rectangle((8 + 6 * index, 10, 40 + 6 * index, 42), fill=(30, 200, 60))
        image.save(class_dir / f"class_{index}.png")
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
        "num_class_images": 4,
        "concept": {"class_data_dir": str(class_dir)},
    }
    with_prior = Trainer(make_settings(output_dir=str(tmp_path / "prior"), with_prior_preservation=True, **common))
    without = Trainer(make_settings(output_dir=str(tmp_path / "no-prior"), **common))
    with_prior.run()
    without.run()
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
        drift_with = (predict(with_prior.components.unet) - reference).pow(2).mean().item()
        drift_without = (predict(without.components.unet) - reference).pow(2).mean().item()
    assert drift_with < 0.9 * drift_without  # measured: about 0.75 of it


def test_same_settings_twice_are_bit_identical_and_prior_weight_matters(make_settings, tmp_path):
    def train(**changes):
        trainer = Trainer(make_settings(with_prior_preservation=True, **changes))
        trainer.run()
        return unet_weights(trainer.components)

    first = train(output_dir=str(tmp_path / "a"))
    assert same_weights(first, train(output_dir=str(tmp_path / "b")))
    assert not same_weights(train(output_dir=str(tmp_path / "c"), prior_loss_weight=0.0), first)


def test_resume_after_cancel_gives_the_same_weights(make_settings, tmp_path):
    common = {"max_train_steps": 6, "hflip": True, "gradient_accumulation_steps": 2, "train_text_encoder": True}
    straight = Trainer(
        make_settings(
            output_dir=str(tmp_path / "straight"),
            **common,
        )
    )
    straight.run()

    class CancelAtThree(Callbacks):
        def __init__(self, commands):
            self.commands = commands

        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == 3:
                self.commands.cancel()

    commands = Commands()
    first = Trainer(
        make_settings(
            output_dir=str(tmp_path / "split"),
            **common,
        ),
        callbacks=CancelAtThree(commands),
        commands=commands,
    )
    interrupted = first.run()
    assert interrupted.cancelled and interrupted.step == 3
    assert (tmp_path / "split" / "state" / "state.json").is_file()
    resumed = Trainer(
        make_settings(
            output_dir=str(tmp_path / "split"),
            **common,
            resume_from=str(interrupted.state_dir),
        )
    )
    result = resumed.run()
    assert result.step == 6
    assert same_weights(unet_weights(straight.components), unet_weights(resumed.components))
    text_a = straight.components.text_encoder.state_dict()
    text_b = resumed.components.text_encoder.state_dict()
    assert all(torch.equal(text_a[k], text_b[k]) for k in text_a)


def test_components_stay_on_their_device_and_dtype_after_samples_and_saves(make_settings, monkeypatch):
    """Sampling moves the VAE and text encoder to the sampling device and back; saving in fp16 copies.  Under bf16
    the frozen VAE and text encoder work in bf16 for the whole run (train/precision.py) and are fp32 again after."""
    import dreambooth.train.sampling as sampling

    moves = []
    seen = {}

    class Snapshot(Callbacks):
        def on_checkpoint(self, step, paths):
            for name in ("unet", "vae", "text_encoder"):
                module = getattr(trainer.components, name)
                seen.setdefault(name, set()).update((p.device.type, p.dtype) for p in module.parameters())

    original_generate = sampling.generate

    def recording_generate(components, *args, **kwargs):
        for module in (components.vae, components.text_encoder):
            original_to = module.to

            def to(*a, _original=original_to, **k):
                moves.append((a, k))
                return _original(*a, **k)

            monkeypatch.setattr(module, "to", to)
        return original_generate(components, *args, **kwargs)

    monkeypatch.setattr("dreambooth.train.loop.generate", recording_generate)
    trainer = Trainer(
        make_settings(
            save_half=True, save_model_every_n_steps=1, max_train_steps=3, n_save_sample=1, mixed_precision="bf16"
        ),
        callbacks=Snapshot(),
    )
    trainer.run()
    assert moves, "sampling moves the VAE / text encoder to the sampling device and back"
    assert seen == {
        "unet": {("cpu", torch.float32)},
        "vae": {("cpu", torch.bfloat16)},
        "text_encoder": {("cpu", torch.bfloat16)},
    }
    for name in ("unet", "vae", "text_encoder"):
        assert {p.dtype for p in getattr(trainer.components, name).parameters()} == {torch.float32}, name


def test_save_now_and_sample_now_commands(make_settings):
    commands = Commands()

    class AtStepOne(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == 1:
                commands.save_now()
            if progress.phase == "training" and progress.step == 2:
                commands.sample_now()

    result = Trainer(make_settings(max_train_steps=4, n_save_sample=1), callbacks=AtStepOne(), commands=commands).run()
    assert [p.name for p in result.checkpoints] == ["dreambooth_1.safetensors", "dreambooth_4.safetensors"]
    steps = sorted({p.parent.name for p in result.samples})
    assert steps == ["step_000001", "step_000002", "step_000004"]


def test_a_failing_callback_does_not_stop_training(make_settings):
    class Broken(Callbacks):
        def on_progress(self, progress):
            raise RuntimeError("UI went away")

    assert Trainer(make_settings(), callbacks=Broken()).run().step == 2


def test_broken_image_is_reported_before_training(make_settings, tmp_path):
    import pytest

    from dreambooth.errors import DreamBoothError

    settings = make_settings()
    (tmp_path / "instance" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DreamBoothError, match=r"broken\.png"):
        Trainer(settings).run()
    assert not (tmp_path / "out" / "dreambooth_2.safetensors").exists()
