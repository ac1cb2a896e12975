"""A training state is resumed only by the optimizer that made its states; Fit my GPU keeps that optimizer.

8-bit and 32-bit AdamW states cannot stand in for each other, and low_memory (fit my GPU) may choose another optimizer
on another GPU (or with the GPU size unknown: every switch, 8-bit AdamW included).
"""

from __future__ import annotations

import json

import pytest

from dreambooth.errors import DreamBoothError
from dreambooth.events import Callbacks
from dreambooth.train.loop import Trainer
from dreambooth.train.state import read_state_info


class Log(Callbacks):
    def __init__(self):
        self.lines = []

    def on_log(self, message):
        self.lines.append(message)


def first_run(make_settings, tmp_path):
    """Two steps with AdamW and a saved state."""
    result = Trainer(make_settings(output_dir=str(tmp_path / "run"), max_train_steps=2)).run()
    assert read_state_info(result.state_dir)["optimizer"] == "adamw"
    return result.state_dir


def test_a_state_made_by_another_optimizer_is_refused_with_a_sentence(make_settings, tmp_path):
    state = first_run(make_settings, tmp_path)
    settings = make_settings(
        output_dir=str(tmp_path / "run"), max_train_steps=4, resume_from=str(state), optimizer="adamw_8bit"
    )
    with pytest.raises(DreamBoothError) as caught:
        Trainer(settings).run()
    message = str(caught.value)
    assert "trained with optimizer adamw but these settings use adamw_8bit" in message
    assert "resume with optimizer adamw" in message


def test_fit_my_gpu_keeps_the_optimizer_of_the_resumed_state(make_settings, tmp_path):
    state = first_run(make_settings, tmp_path)
    log = Log()
    # The GPU size is not known on the CPU: fit my GPU turns every switch on, 8-bit AdamW included, but not here.
    settings = make_settings(
        output_dir=str(tmp_path / "run"), max_train_steps=3, resume_from=str(state), low_memory=True
    )
    result = Trainer(settings, callbacks=log).run()
    assert result.step == 3
    assert any("optimizer adamw kept, as the resumed state was made with it" in line for line in log.lines)
    assert read_state_info(result.state_dir)["optimizer"] == "adamw"


def test_a_state_without_the_optimizer_recorded_still_resumes(make_settings, tmp_path):
    """States written before the optimizer was recorded (0.2.0) resume as before."""
    state = first_run(make_settings, tmp_path)
    marker = state / "state.json"
    info = json.loads(marker.read_text())
    del info["optimizer"]
    marker.write_text(json.dumps(info))
    settings = make_settings(output_dir=str(tmp_path / "run"), max_train_steps=3, resume_from=str(state))
    assert Trainer(settings).run().step == 3
