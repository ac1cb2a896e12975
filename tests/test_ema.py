"""use_ema: the average equals its closed form, the saves hold it, it resumes exactly, LoRA averages the adapter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dreambooth.events import Callbacks
from dreambooth.models.components import load_components
from dreambooth.settings import Settings
from dreambooth.train.ema import WeightsEMA, ema_decay_at
from dreambooth.train.loop import Trainer


def closed_form(sequence: list[dict], decay: float, update_every: int) -> dict:
    """The EMA after the steps of ``sequence`` (the weights after step 1, 2, ...), as a weighted sum in float64: the
    update k (after step k * update_every) has the decay d_k = 0 for k = 1, else min(decay, k / (k + 9)); the
    weights of update j enter with (1 - d_j) x the product of the later d_k."""
    updated = sequence[update_every - 1 :: update_every]
    decays = [0.0] + [min(decay, k / (k + 9)) for k in range(2, len(updated) + 1)]
    total = {name: torch.zeros_like(value, dtype=torch.float64) for name, value in updated[0].items()}
    for j, weights in enumerate(updated):
        factor = 1.0 - decays[j]
        for later in decays[j + 1 :]:
            factor *= later
        for name, value in weights.items():
            total[name] += factor * value.double()
    return total


def test_the_decay_warms_up_as_diffusers_ema_model_does():
    assert ema_decay_at(1, 0.999) == 0.0  # the first update copies the weights
    assert [ema_decay_at(k, 0.999) for k in (2, 3, 11)] == [2 / 11, 3 / 12, 11 / 20]
    assert ema_decay_at(5, 0.3) == 0.3 and ema_decay_at(10**6, 0.999) == 0.999
    try:  # diffusers' EMAModel (cannot be imported beside transformers 4.30: the WebUI's environment)
        from diffusers.training_utils import EMAModel
    except Exception:
        return
    reference = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=0.99)
    assert [reference.get_decay(k) for k in range(1, 300)] == [ema_decay_at(k, 0.99) for k in range(1, 300)]


def test_the_ema_equals_the_closed_form_after_k_steps_with_update_every():
    generator = torch.Generator().manual_seed(0)
    parameter = torch.nn.Parameter(torch.randn(5, 3, generator=generator))
    ema = WeightsEMA({"w": parameter}, decay=0.3, update_every=2, device="cpu")
    sequence = []
    for step in range(1, 12):
        with torch.no_grad():
            parameter.copy_(torch.randn(5, 3, generator=generator))
        sequence.append({"w": parameter.detach().clone()})
        ema.after_step(step)
    assert ema.updates == 5
    torch.testing.assert_close(ema.shadow["w"].double(), closed_form(sequence, 0.3, 2)["w"], rtol=0, atol=1e-6)


def test_swapping_in_gives_the_ema_and_back_the_trained_weights_bit_for_bit():
    parameter = torch.nn.Parameter(torch.randn(4, 4, dtype=torch.bfloat16))
    ema = WeightsEMA({"w": parameter}, decay=0.5, update_every=1, device="cpu")
    trained = parameter.detach().clone()
    ema.shadow["w"].fill_(0.25)
    with ema.swapped_in():
        assert parameter.dtype == torch.bfloat16 and bool((parameter == 0.25).all())
    assert torch.equal(parameter, trained)


class WeightsPerStep(Callbacks):
    """The UNet's weights after each step (the callback runs after the step and its EMA update)."""

    def __init__(self):
        self.trainer = None
        self.sequence = []

    def on_progress(self, progress):
        if progress.phase == "training":
            unet = self.trainer.components.unet
            self.sequence.append({k: v.detach().clone() for k, v in unet.named_parameters()})


def test_the_saved_checkpoint_holds_the_ema_of_the_run_and_both_keeps_the_trained_weights(make_settings, tmp_path):
    recorder = WeightsPerStep()
    settings = make_settings(
        max_train_steps=7, use_ema=True, ema_decay=0.2, ema_update_every=2, ema_output="both", learning_rate=3e-3
    )
    trainer = recorder.trainer = Trainer(settings, callbacks=recorder)
    result = trainer.run()
    expected = closed_form(recorder.sequence, 0.2, 2)  # updates after steps 2, 4, 6 (the third's decay: 0.2)
    saved = load_components(result.checkpoints[-1]).unet.state_dict()
    assert result.checkpoints[-1].name == "dreambooth_7.safetensors"
    for name, value in expected.items():
        torch.testing.assert_close(saved[name].double(), value, rtol=0, atol=1e-6)
    trained = load_components(tmp_path / "out" / "dreambooth_7_trained.safetensors").unet.state_dict()
    after = trainer.components.unet.state_dict()  # the modules hold the trained weights again after the run
    assert all(torch.equal(trained[k], after[k]) for k in expected)
    assert all(torch.equal(after[k], recorder.sequence[-1][k]) for k in expected)


def test_the_ema_resumes_exactly(make_settings, tmp_path):
    common = {"use_ema": True, "ema_decay": 0.9, "train_text_encoder": True}
    straight = Trainer(make_settings(output_dir=str(tmp_path / "straight"), max_train_steps=4, **common))
    straight.run()
    first = Trainer(make_settings(output_dir=str(tmp_path / "split"), max_train_steps=2, **common))
    first.run()
    assert (tmp_path / "split" / "state" / "ema.safetensors").is_file()
    resumed = Trainer(
        make_settings(
            output_dir=str(tmp_path / "split"), max_train_steps=4, resume_from=str(tmp_path / "split"), **common
        )
    )
    resumed.run()
    assert resumed.ema.updates == straight.ema.updates == 4
    assert any(name.startswith("text_encoder.") for name in resumed.ema.shadow)
    for name, value in straight.ema.shadow.items():
        assert torch.equal(value, resumed.ema.shadow[name]), name


def test_with_lora_the_ema_is_of_the_adapter_and_its_file_holds_it(make_settings):
    from dreambooth.network.files import read_network_file

    trainer = Trainer(make_settings(training_method="lora", use_ema=True, max_train_steps=3, network_unet_lr=1e-2))
    result = trainer.run()
    network = trainer.method.network
    assert set(trainer.ema.shadow) == {f"network.{name}" for name, _ in network.named_parameters()}
    saved = read_network_file(result.checkpoints[-1]).tensors
    trained = network.kohya_tensors()
    with trainer.ema.swapped_in():
        averaged = network.kohya_tensors()
    assert all(torch.equal(saved[key], averaged[key].float()) for key in saved)
    assert any(not torch.equal(saved[key], trained[key]) for key in saved if key.endswith("lora_up.weight"))


def test_ema_with_schedule_free_is_refused_in_one_sentence():
    settings = Settings(use_ema=True, optimizer="adamw_schedule_free")
    assert any(p.startswith("use_ema cannot be used with optimizer adamw_schedule_free") for p in settings.validate())


@pytest.mark.parametrize("on_cpu", [False, True])
def test_the_memory_estimate_counts_the_ema_on_the_gpu_only(on_cpu):
    from dreambooth.bench import bench_architecture
    from dreambooth.memory.estimate import estimate

    arch = bench_architecture("bench-tiny")
    settings = Settings(pretrained_model_name_or_path="x", resolution=64, use_ema=True, ema_on_cpu=on_cpu)
    breakdown = estimate(settings, arch).breakdown
    weights = estimate(dataclasses.replace(settings, use_ema=False), arch).breakdown["weights, trained (fp32)"]
    assert breakdown.get("EMA weights (fp32)", 0) == (0 if on_cpu else weights)


def test_save_total_limit_removes_the_trained_companion_with_its_checkpoint(make_settings, tmp_path):
    settings = make_settings(
        use_ema=True, ema_output="both", save_model_every_n_steps=1, save_total_limit=1, save_training_state=False
    )
    Trainer(settings).run()
    names = sorted(p.name for p in (tmp_path / "out").glob("*.safetensors"))
    assert names == ["dreambooth_2.safetensors", "dreambooth_2_trained.safetensors"]
