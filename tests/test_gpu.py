"""What the GPU-only options do on a GPU (marker ``gpu``; skipped on machines without CUDA).

The CPU suite checks the calls these options make (tests/test_fields.py); here their effect is checked: fp16 mixed
precision trains with a gradient scaler and keeps fp32 weights, 8-bit AdamW keeps 8-bit optimizer states, xformers
replaces the attention processors, the VAE and a frozen text encoder work in the mixed-precision dtype and wait off the
GPU once their outputs are cached (train/precision.py), low_memory turns gradient checkpointing on, fused_backward
with full_bf16 trains bf16 weights in a lower peak, and every
component is back on the GPU in its dtype after samples and saves.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dreambooth.train.loop import Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def unet_digest(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().float().cpu().clone() for p in trainer.components.unet.parameters()]


def test_fp16_mixed_precision_trains_with_fp32_weights(make_settings):
    fp32 = Trainer(make_settings(device="cuda", max_train_steps=3))
    fp32.run()
    half = Trainer(make_settings(device="cuda", max_train_steps=3, mixed_precision="fp16", model_name="half"))
    outcome = half.run()
    assert outcome.step == 3 and all(torch.isfinite(torch.tensor(loss)) for _, loss in outcome.losses)
    assert all(p.dtype == torch.float32 for p in half.components.unet.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(unet_digest(fp32), unet_digest(half)))


def test_bf16_mixed_precision_trains(make_settings):
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    outcome = Trainer(make_settings(device="cuda", max_train_steps=2, mixed_precision="bf16")).run()
    assert outcome.step == 2


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_eight_bit_adam_keeps_8bit_states(make_settings, monkeypatch):
    import bitsandbytes as bnb

    from dreambooth.train import optim

    made = []
    original = optim.make_optimizer
    monkeypatch.setattr(optim, "make_optimizer", lambda *a, **k: made.append(original(*a, **k)) or made[-1])
    trainer = Trainer(make_settings(device="cuda", max_train_steps=2, optimizer="adamw_8bit"))
    trainer.run()
    [optimizer] = made
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    states = [s for s in optimizer.state.values() if "state1" in s]
    assert states and any(s["state1"].dtype == torch.uint8 for s in states)


@pytest.mark.skipif(importlib.util.find_spec("xformers") is None, reason="needs xformers")
def test_xformers_replaces_the_attention_processors(make_settings):
    trainer = Trainer(make_settings(device="cuda", max_train_steps=2, attention="xformers"))
    trainer.run()
    names = {type(p).__name__ for p in trainer.components.unet.attn_processors.values()}
    assert names and all("XFormers" in n for n in names)


def test_low_memory_on_a_gpu_the_model_fits_turns_nothing_on(make_settings):
    trainer = Trainer(make_settings(device="cuda", max_train_steps=1, low_memory=True))
    trainer.run()
    # the tiny model fits the GPU as it is: Fit my GPU has nothing to turn on (tests/test_fields.py: what it chooses)
    assert not trainer.components.unet.is_gradient_checkpointing and trainer.settings.mixed_precision == "no"


@pytest.mark.parametrize("precision", ["no", "fp16", "bf16"])
@pytest.mark.parametrize("train_text", [False, True], ids=["frozen-text", "trained-text"])
def test_frozen_modules_cache_in_half_precision_wait_on_the_cpu_and_checkpoints_keep_fp32(
    make_settings, monkeypatch, precision, train_text
):
    """The caches fill with the VAE (and a frozen text encoder) on the GPU in the run's dtype; during the steps they
    wait on the CPU (a trained text encoder: on the GPU in fp32); the checkpoint and the modules after the run hold
    the base model's exact fp32 weights."""
    from dreambooth.data import cache
    from dreambooth.events import Callbacks
    from dreambooth.models.components import load_components

    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    half = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    caching, steps = set(), {"vae": set(), "text_encoder": set()}
    original = cache.latent_distribution

    def spy(vae, image):
        caching.add((next(vae.parameters()).device.type, next(vae.parameters()).dtype))
        return original(vae, image)

    class During(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training":
                for name in steps:
                    parameter = next(getattr(trainer.components, name).parameters())
                    steps[name].add((parameter.device.type, parameter.dtype))

    monkeypatch.setattr(cache, "latent_distribution", spy)
    settings = make_settings(device="cuda", max_train_steps=2, mixed_precision=precision, train_text_encoder=train_text)
    trainer = Trainer(settings, callbacks=During())
    result = trainer.run()
    assert caching == {("cuda", half)}
    assert steps["vae"] == {("cpu", half)}
    assert steps["text_encoder"] == ({("cuda", torch.float32)} if train_text else {("cpu", half)})
    base = load_components(trainer.settings.pretrained_model_name_or_path)
    saved = load_components(result.checkpoints[-1])
    for name in ("vae",) if train_text else ("vae", "text_encoder"):
        module = getattr(trainer.components, name)
        assert {(p.device.type, p.dtype) for p in module.parameters()} == {("cuda", torch.float32)}
        for other in (getattr(saved, name), module):
            a, b = getattr(base, name).state_dict(), other.state_dict()
            assert all(torch.equal(a[k], b[k].cpu()) for k in a), name


def test_samples_in_fp16_with_the_vae_in_fp16(make_settings):
    trainer = Trainer(make_settings(device="cuda", max_train_steps=1, mixed_precision="fp16", n_save_sample=2))
    result = trainer.run()
    assert len(result.samples) == 2


def test_components_are_back_on_the_gpu_after_samples_and_saves(make_settings):
    trainer = Trainer(
        make_settings(device="cuda", max_train_steps=4, save_model_every_n_steps=2, n_save_sample=1, save_half=True)
    )
    result = trainer.run()
    assert len(result.samples) >= 2 and len(result.checkpoints) >= 2
    for name in ("unet", "vae", "text_encoder"):
        parameter = next(getattr(trainer.components, name).parameters())
        assert parameter.device.type == "cuda" and parameter.dtype == torch.float32, name


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="needs bitsandbytes")
def test_fused_backward_and_bf16_weights_train_on_the_gpu_in_less_memory(make_settings, monkeypatch):
    """fused_backward + full_bf16 + 8-bit AdamW: bf16 weights on the GPU while training, 8-bit states, finite losses;
    the peak of the step is lower than the ordinary run's (the gradients never all exist at once)."""
    if not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")

    from dreambooth.events import Callbacks

    class Peak(Callbacks):
        def __init__(self):
            self.dtypes, self.peaks = set(), []

        def on_progress(self, progress):
            if progress.phase == "training":
                self.dtypes.update(p.dtype for p in trainer.components.unet.parameters())
                self.peaks.append(torch.cuda.max_memory_allocated())
            torch.cuda.reset_peak_memory_stats()

    common = {"device": "cuda", "max_train_steps": 3, "mixed_precision": "bf16", "optimizer": "adamw_8bit"}
    ordinary = Peak()
    trainer = Trainer(make_settings(model_name="ordinary", **common), callbacks=ordinary)
    trainer.run()
    fused = Peak()
    trainer = Trainer(make_settings(model_name="fused", fused_backward=True, full_bf16=True, **common), callbacks=fused)
    outcome = trainer.run()
    assert outcome.step == 3 and all(torch.isfinite(torch.tensor(loss)) for _, loss in outcome.losses)
    assert fused.dtypes == {torch.bfloat16} and ordinary.dtypes == {torch.float32}
    # steps 2 and 3 (the first step's peak also holds the optimizer states being created)
    assert max(fused.peaks[1:]) < max(ordinary.peaks[1:])
