"""The frozen modules (VAE, a text encoder that is not trained) in the mixed-precision dtype for the whole run, off
the training device while their outputs are cached, and saved with their exact fp32 weights (train/precision.py).

On the CPU only bf16 can run (validation refuses fp16 there); fp16 and the GPU's placement are checked through the
placement function here and for real in tests/test_gpu.py.
"""

from __future__ import annotations

import pytest
import torch

from dreambooth.events import Callbacks
from dreambooth.models.components import load_components
from dreambooth.train.loop import Trainer
from dreambooth.train.precision import frozen_placement, half_copy
from dreambooth.train.sampling import decode

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
HALF = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
@pytest.mark.parametrize("train_text", [False, True], ids=["frozen-text", "trained-text"])
def test_placement_on_a_gpu_for_each_precision_and_text_encoder_mode(make_settings, precision, train_text):
    settings = make_settings(mixed_precision=precision, train_text_encoder=train_text)
    placement = frozen_placement(settings, CUDA)
    assert placement["vae"] == (CPU, HALF[precision])  # latents cached: not needed by the steps
    if train_text:
        assert placement["text_encoder"] == (CUDA, torch.float32)  # trained: fp32 weights on the GPU
    else:
        assert placement["text_encoder"] == (CPU, HALF[precision])  # embeddings cached


def test_placement_keeps_a_module_on_the_gpu_when_the_steps_need_it(make_settings):
    settings = make_settings(mixed_precision="fp16", cache_latents=False)
    assert frozen_placement(settings, CUDA)["vae"] == (CUDA, torch.float16)  # encodes every step
    settings = make_settings(mixed_precision="fp16")
    assert frozen_placement(settings, CUDA, inpainting=True)["vae"] == (CUDA, torch.float16)  # masked images
    assert frozen_placement(settings, CUDA, cache_text=False)["text_encoder"] == (CUDA, torch.float16)


def test_placement_on_the_cpu_takes_bf16_but_not_fp16(make_settings):
    assert frozen_placement(make_settings(mixed_precision="bf16"), CPU)["vae"] == (CPU, torch.bfloat16)
    assert frozen_placement(make_settings(mixed_precision="fp16"), CPU)["vae"] == (CPU, torch.float32)


def test_low_memory_no_longer_changes_the_placement(make_settings):
    for precision in ("no", "bf16"):
        plain = frozen_placement(make_settings(mixed_precision=precision), CUDA)
        assert frozen_placement(make_settings(mixed_precision=precision, low_memory=True), CUDA) == plain


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("train_text", [False, True], ids=["frozen-text", "trained-text"])
def test_frozen_modules_in_the_steps_and_the_exact_base_weights_in_checkpoints_and_after(
    make_settings, precision, train_text
):
    """The WebUI's way: the trainer gets components in memory; it must hand them back unchanged."""
    settings = make_settings(mixed_precision=precision, train_text_encoder=train_text, max_train_steps=1)
    base = load_components(settings.pretrained_model_name_or_path)
    given = load_components(settings.pretrained_model_name_or_path)
    given_vae, given_text = given.vae, given.text_encoder
    seen: dict[str, set] = {"vae": set(), "text_encoder": set()}

    class During(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training":
                for name in seen:
                    parameter = next(getattr(trainer.components, name).parameters())
                    seen[name].add((parameter.device, parameter.dtype))

    trainer = Trainer(settings, callbacks=During(), components=given)
    result = trainer.run()

    expected = frozen_placement(settings.effective(), CPU)
    assert seen == {name: {tuple(expected[name])} for name in seen}
    assert seen["vae"] == {(CPU, HALF[precision])}
    assert seen["text_encoder"] == {(CPU, torch.float32 if train_text else HALF[precision])}
    saved = load_components(result.checkpoints[-1])
    assert same_weights(saved.vae, base.vae)
    assert trainer.components.vae is given_vae and same_weights(given_vae, base.vae)  # back, unchanged
    assert trainer.components.text_encoder is given_text
    if not train_text:
        assert same_weights(saved.text_encoder, base.text_encoder)
        assert same_weights(given_text, base.text_encoder)


@pytest.mark.slow
def test_samples_and_an_inpainting_model_in_bf16(make_settings, tiny_checkpoint):
    """Inpainting encodes masked images every step, so its VAE stays on the device in bf16; samples decode in bf16."""
    settings = make_settings(
        pretrained_model_name_or_path=str(tiny_checkpoint("sd1-inpainting")),
        mixed_precision="bf16",
        max_train_steps=1,
        n_save_sample=1,
    )
    seen = set()

    class During(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training":
                parameter = next(trainer.components.vae.parameters())
                seen.add((parameter.device, parameter.dtype))

    trainer = Trainer(settings, callbacks=During())
    result = trainer.run()
    assert seen == {(CPU, torch.bfloat16)}
    assert frozen_placement(settings, CUDA, inpainting=True)["vae"] == (CUDA, torch.bfloat16)
    assert len(result.samples) == 1 and result.samples[0].stat().st_size > 0


def test_half_copy_converts_floats_only_and_leaves_the_original(tiny_checkpoint):
    text_encoder = load_components(tiny_checkpoint("sd1")).text_encoder
    before = {k: v.clone() for k, v in text_encoder.state_dict().items()}
    copy = half_copy(text_encoder, "cpu", torch.bfloat16)
    for key, value in copy.state_dict().items():
        assert value.dtype == (torch.bfloat16 if before[key].is_floating_point() else before[key].dtype), key
        assert torch.equal(value, before[key].to(value.dtype))
    assert all(torch.equal(before[k], v) for k, v in text_encoder.state_dict().items())
    assert [p.requires_grad for p in copy.parameters()] == [p.requires_grad for p in text_encoder.parameters()]


def test_an_fp16_decode_that_overflows_is_done_again_in_fp32(tiny_checkpoint):
    vae = load_components(tiny_checkpoint("sd1")).vae
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e4)  # activations past fp16's 65504
    half = half_copy(vae, "cpu", torch.float16)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        overflowing = half.decode(latents.half() / half.config.scaling_factor).sample
        assert not torch.isfinite(overflowing).all()
        images = decode(half, latents)
        expected = half_copy(half, "cpu", torch.float32).decode(latents / half.config.scaling_factor).sample
    assert torch.isfinite(images).all() and torch.equal(images, expected)
    assert {p.dtype for p in half.parameters()} == {torch.float16}  # the same fp16 weights again


def test_a_failure_while_placing_leaves_the_given_modules_in_the_components(tiny_checkpoint, monkeypatch):
    from dreambooth.train import precision

    components = load_components(tiny_checkpoint("sd1"))
    given = (components.vae, components.text_encoder)
    made = []

    def failing_copy(module, device, dtype):
        if made:
            raise RuntimeError("CUDA out of memory")  # the second copy fails
        made.append(half_copy(module, device, dtype))
        return made[-1]

    monkeypatch.setattr(precision, "half_copy", failing_copy)
    bf16 = precision.Placement(CPU, torch.bfloat16)
    with pytest.raises(RuntimeError, match="out of memory"):
        precision.FrozenModules(components, {"vae": bf16, "text_encoder": bf16}, CPU)
    assert (components.vae, components.text_encoder) == given
    assert {p.dtype for p in components.vae.parameters()} == {torch.float32}
