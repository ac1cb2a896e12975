"""Issue 16's options on an SDXL model (issue 15): the validation loss, the base model's prior and the EMA go through
the SDXL family's UNet inputs (pooled embedding, time ids of each crop), not only the SD ones."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dreambooth.events import Callbacks
from dreambooth.train.loop import Trainer


class Recorder(Callbacks):
    def __init__(self):
        self.validation: list[float] = []

    def on_progress(self, progress):
        if progress.validation_loss is not None and progress.phase == "validation":
            self.validation.append(progress.validation_loss)


@pytest.fixture
def sdxl_settings(make_settings, tiny_checkpoint):
    def make(**changes):
        return make_settings(**{"pretrained_model_name_or_path": str(tiny_checkpoint("sdxl")), **changes})

    return make


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "full"])
def test_sdxl_with_the_base_prior_the_ema_and_the_validation_loss(sdxl_settings, tmp_path, method):
    """Two steps of an SDXL run with prior_from_base_model, use_ema, a held-out image and save_best: no class image
    is made, the validation loss is finite and reported at step 1 and 2, and the best file is written."""
    recorder = Recorder()
    settings = sdxl_settings(
        training_method=method,
        prior_from_base_model=True,
        use_ema=True,
        validation_split=0.34,
        validation_steps=1,
        save_best=True,
        lora_dir=str(tmp_path / "Lora"),
    )
    trainer = Trainer(settings, callbacks=recorder)
    result = trainer.run()
    assert result.step == 2
    assert len(recorder.validation) == 2 and all(torch.isfinite(torch.tensor(recorder.validation)))
    assert not (tmp_path / "class").exists() or not any((tmp_path / "class").iterdir())
    best = trainer._best_file()
    assert best.is_file(), best


@pytest.mark.slow
def test_the_sdxl_validation_loss_is_the_same_for_the_same_weights(sdxl_settings):
    """Computed twice on the same weights: the same number; other weights, another number (SDXL: the time ids
    of the held-out image's crop)."""
    trainer = Trainer(sdxl_settings(validation_split=0.34, validation_steps=1, max_train_steps=1))
    trainer.run()
    run = SimpleNamespace(
        device=torch.device("cpu"),
        optimizer=torch.optim.SGD([torch.zeros(1)], lr=0.1),
        autocast=torch.autocast("cpu", enabled=False),
    )
    first = trainer.validation.compute(run)
    assert first == trainer.validation.compute(run)
    with torch.no_grad():
        trainer.components.unet.conv_out.bias.add_(0.1)
    assert trainer.validation.compute(run) != first


def test_the_cli_trains_sdxl_at_1024_unless_a_resolution_is_given(make_settings, tiny_checkpoint, tmp_path):
    """`train --config`: a settings file without a resolution trains an SDXL base at its family's 1024 (with a note);
    one given in the file or with --set stays, and an SD base keeps 512."""
    import json

    from dreambooth.cli import _family_resolution

    def resolved(family, data, assignments=()):
        given = dict(a.split("=") for a in assignments)  # what Settings.load + --set made of the file
        resolution = int(given.get("resolution", data.get("resolution", 512)))
        settings = make_settings(pretrained_model_name_or_path=str(tiny_checkpoint(family)), resolution=resolution)
        config = tmp_path / "settings.json"
        config.write_text(json.dumps(data))
        notes = []
        return _family_resolution(settings, config, list(assignments), notes).resolution, notes

    resolution, notes = resolved("sdxl", {})
    assert resolution == 1024 and notes == [
        "resolution 1024: the default of the base model's family (set resolution to change it)"
    ]
    assert resolved("sdxl", {"resolution": 256}) == (256, [])
    assert resolved("sdxl", {}, ["resolution=128"]) == (128, [])
    assert resolved("sd1", {}) == (512, [])
