"""``kill -9`` at several moments of a run (tests/crash_runner.py kills the CLI's process at that moment): each
leaves a resumable state and intact earlier checkpoints, and resuming reaches the uninterrupted run's weights bit for
bit.  The run: 6 steps, a checkpoint and state every 2 steps; the kill comes in step 5 or in the save of step 4."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreambooth.models.files import read_state_dict
from dreambooth.train.loop import Trainer
from dreambooth.train.state import find_state, state_step

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "crash_runner.py"
RUN_SECONDS = 300
STEPS = 6

pytestmark = pytest.mark.slow

MOMENTS = {  # moment: (environment, the step of the newest complete state after the kill)
    "during-a-step": ({"DREAMBOOTH_TEST_KILL_AT": "step", "DREAMBOOTH_TEST_KILL_STEP": "5"}, 4),
    "during-a-checkpoint-save": ({"DREAMBOOTH_TEST_KILL_AT": "checkpoint", "DREAMBOOTH_TEST_KILL_STEP": "4"}, 2),
    "during-a-state-save": ({"DREAMBOOTH_TEST_KILL_AT": "state", "DREAMBOOTH_TEST_KILL_SAVE": "2"}, 2),
    "between-the-renames": ({"DREAMBOOTH_TEST_KILL_AT": "between_renames", "DREAMBOOTH_TEST_KILL_SAVE": "2"}, 4),
}


def checkpoint_unet(path: Path) -> dict:
    tensors, _ = read_state_dict(path)
    return {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}


@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_kill_leaves_a_resumable_state_and_the_earlier_checkpoints(make_settings, tmp_path, moment):
    environment, state_at = MOMENTS[moment]
    common = {"max_train_steps": STEPS, "save_model_every_n_steps": 2}
    straight = Trainer(make_settings(output_dir=str(tmp_path / "straight"), **common))
    straight.run()
    out = tmp_path / "killed"
    config = tmp_path / "killed.json"
    make_settings(output_dir=str(out), **common).save(config)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **environment}
    killed = subprocess.run(
        [sys.executable, str(RUNNER), "train", "--config", str(config)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_SECONDS,
        check=False,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "dreambooth_6.safetensors").exists()
    state = find_state(out / "state")
    assert state is not None and state_step(state) == state_at
    if moment == "between-the-renames":  # the window: no ``state``; the new state is under its temporary name
        assert not (out / "state").exists() and state.name.startswith(".state.")
    for step in range(2, state_at + 1, 2):  # every checkpoint saved before the kill is whole
        saved = checkpoint_unet(out / f"dreambooth_{step}.safetensors")
        reference = checkpoint_unet(tmp_path / "straight" / f"dreambooth_{step}.safetensors")
        assert all(torch.equal(saved[k], reference[k]) for k in reference)
    resumed = Trainer(make_settings(output_dir=str(out), resume_from=str(out / "state"), **common))
    assert resumed.run().step == STEPS
    a, b = straight.components.unet.state_dict(), resumed.components.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
