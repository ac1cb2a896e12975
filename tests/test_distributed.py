"""The trainer data-parallel under ``torchrun --nproc_per_node 2`` (gloo, CPU): the same math as one process with
the whole batch, one writer, failures that end every process, and resume across process counts.

Tolerance: one process sums a batch of 2 inside each kernel, two processes add two gradients afterwards, and torchrun
runs each process with one thread; those additions in another order move fp32 results by about 1e-7, which Adam can
turn into full-size steps on near-zero gradients.  So the runs are compared by how far apart they end relative to how
far they moved from the base model (below 1%); a different sample or a missing gradient moves them by 100% or more.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreambooth.models.files import read_state_dict
from dreambooth.train.loop import Trainer

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "dist_runner.py"
LAUNCH_SECONDS = 240

pytestmark = pytest.mark.slow


def _port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def torchrun(config: Path, *overrides: str, processes: int = 2, env: dict | None = None):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command += ["--master_addr", "127.0.0.1", "--master_port", _port(), str(RUNNER), "train", "--config", str(config)]
    for item in overrides:
        command += ["--set", item]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=LAUNCH_SECONDS, check=False
    )


def unet(path: Path) -> dict:
    tensors, _ = read_state_dict(path)
    return {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}


def assert_same_training(a: dict, b: dict, base: dict, tolerance: float = 0.01) -> None:
    apart = torch.cat([(a[k] - b[k]).flatten() for k in base]).norm()
    moved = torch.cat([(b[k] - base[k]).flatten() for k in base]).norm()
    assert moved > 0 and apart <= tolerance * moved, f"runs {apart:.3g} apart after moving {moved:.3g}"


@pytest.fixture
def setup(make_settings, tmp_path, tiny_checkpoint):
    """Settings files for the 2-process runs, with the class images made once beforehand (shared by all runs)."""

    def make(name: str, **changes):
        settings = make_settings(output_dir=str(tmp_path / name), **changes)
        path = tmp_path / f"{name}.json"
        settings.save(path)
        return settings, path

    base = unet(tiny_checkpoint("sd1"))
    return make, base


@pytest.mark.parametrize("prior", [False, True], ids=["no-prior", "prior"])
def test_two_processes_of_batch_1_train_like_one_process_of_batch_2(setup, prior, tmp_path):
    make, base = setup
    common = {"max_train_steps": 3, "gradient_accumulation_steps": 2, "with_prior_preservation": prior}
    one, _ = make("one", train_batch_size=2, **common)
    reference = Trainer(one).run()  # also makes the class images both runs share
    _, config = make("two", train_batch_size=1, save_model_every_n_steps=2, n_save_sample=1, **common)
    result = torchrun(config, "report_to=tensorboard", env={"DREAMBOOTH_TEST_BUCKET_BYTES": str(64 * 2**10)})
    assert result.returncode == 0, result.stderr[-3000:]  # gradients summed in buckets of 64 KiB: several
    out = tmp_path / "two"
    assert_same_training(unet(out / "dreambooth_3.safetensors"), unet(reference.checkpoints[0]), base)
    # one writer: one checkpoint per save, one set of samples, one state, one log, one progress bar
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["dreambooth_2.safetensors", "dreambooth_3.safetensors"]
    assert [len(list(d.glob("*.png"))) for d in sorted((out / "samples").iterdir())] == [1, 1]
    assert len(list((out / "logs").rglob("events.out.tfevents*"))) == 1
    assert json.loads((out / "state" / "state.json").read_text())["step"] == 3
    assert result.stdout.count("resumable state:") == 1  # the summary of one process only


def test_two_processes_train_a_lora_like_one_process(setup, tmp_path):
    """LoRA with prior preservation and the text encoder's adapters: two processes of batch 1 train the adapter
    one process of batch 2 trains, and one process writes the LoRA files."""
    from dreambooth.models.components import load_components
    from dreambooth.network.adapter import build_network
    from dreambooth.network.files import read_network_file

    make, _ = setup
    common = {
        "max_train_steps": 3,
        "with_prior_preservation": True,
        "training_method": "lora",
        "network_train_text_encoder": True,
        "network_unet_lr": 1e-3,
    }
    one, _ = make("lora-one", train_batch_size=2, **common)
    reference = Trainer(one).run()
    start = build_network(load_components(one.pretrained_model_name_or_path), one).kohya_tensors()
    _, config = make("lora-two", train_batch_size=1, save_model_every_n_steps=2, **common)
    result = torchrun(config)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "lora-two"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["dreambooth_2.safetensors", "dreambooth_3.safetensors"]
    two = read_network_file(out / "dreambooth_3.safetensors").tensors
    assert_same_training(two, read_network_file(reference.checkpoints[0]).tensors, start)


def test_two_processes_with_concept_weights_repeats_and_save_best_train_like_one(make_settings, setup, tmp_path):
    """Two concepts (loss_weight 0.25 on the second, repeats 2 on the first), a validation share and save_best: two
    processes of batch 1 train as one process of batch 2, and one NAME_best of the same step is written."""
    from conftest import draw_subject

    _, base = setup
    draw_subject(tmp_path / "other", count=3, size=(64, 64), seed=3)

    def make(name: str, **changes):
        settings = make_settings(
            output_dir=str(tmp_path / name),
            max_train_steps=3,
            validation_split=0.34,
            validation_steps=1,
            save_best=True,
            **changes,
        )
        first = dataclasses.replace(settings.concepts[0], repeats=2)
        second = dataclasses.replace(
            first, instance_data_dir=str(tmp_path / "other"), instance_prompt="photo of qlx cup", repeats=None
        )
        settings = dataclasses.replace(settings, concepts=[first, dataclasses.replace(second, loss_weight=0.25)])
        path = tmp_path / f"{name}.json"
        settings.save(path)
        return settings, path

    one, _ = make("concepts-one", train_batch_size=2)
    Trainer(one).run()
    _, config = make("concepts-two", train_batch_size=1)
    result = torchrun(config)
    assert result.returncode == 0, result.stderr[-3000:]
    reference, two = tmp_path / "concepts-one", tmp_path / "concepts-two"
    assert_same_training(unet(two / "dreambooth_3.safetensors"), unet(reference / "dreambooth_3.safetensors"), base)
    assert sorted(p.name for p in two.glob("*.safetensors")) == [
        "dreambooth_3.safetensors",
        "dreambooth_best.safetensors",
    ]
    steps = [
        read_state_dict(folder / "dreambooth_best.safetensors")[1]["dreambooth.step"] for folder in (reference, two)
    ]
    assert steps[0] == steps[1]


def test_a_failure_in_one_process_ends_the_run_with_its_message(setup):
    make, _ = setup
    _, config = make("failing", max_train_steps=50)
    result = torchrun(config, env={"DREAMBOOTH_TEST_FAIL_RANK": "1", "DREAMBOOTH_TEST_FAIL_AFTER": "2"})
    assert result.returncode != 0
    assert "injected failure in the process of rank 1" in result.stdout + result.stderr


@pytest.fixture
def interrupted(setup, tmp_path):
    """An uninterrupted 2-process run of 6 steps, and one killed in step 4 after saving at step 3."""
    make, base = setup
    common = {"max_train_steps": 6, "save_model_every_n_steps": 3, "hflip": True}
    _, straight = make("straight", **common)
    assert torchrun(straight).returncode == 0
    settings, killed = make("killed", **common)
    crash = torchrun(killed, env={"DREAMBOOTH_TEST_FAIL_RANK": "1", "DREAMBOOTH_TEST_FAIL_AFTER": "3"})
    assert crash.returncode != 0 and not (tmp_path / "killed" / "dreambooth_6.safetensors").exists()
    state = tmp_path / "killed" / "state"
    assert json.loads((state / "state.json").read_text())["step"] == 3
    return settings, killed, state, unet(tmp_path / "straight" / "dreambooth_6.safetensors"), base


def test_kill_and_resume_under_two_processes_reaches_the_uninterrupted_weights(interrupted, tmp_path):
    _, killed, state, straight, _ = interrupted
    result = torchrun(killed, f"resume_from={state}")
    assert result.returncode == 0, result.stderr[-3000:]
    resumed = unet(tmp_path / "killed" / "dreambooth_6.safetensors")
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)  # same processes, same order: exact


def test_a_two_process_state_resumes_on_one_process(interrupted, tmp_path):
    settings, _, state, straight, base = interrupted
    one = dataclasses.replace(settings, train_batch_size=2, resume_from=str(state), output_dir=str(tmp_path / "one"))
    result = Trainer(one).run()  # the same global batch (1 x 2 processes = 2 x 1 process): the same samples
    assert result.step == 6
    assert_same_training(unet(result.checkpoints[-1]), straight, base)


def test_num_processes_hands_over_to_a_launcher(setup, tmp_path):
    make, _ = setup
    _, config = make("short", max_train_steps=2)
    command = [sys.executable, "-m", "dreambooth", "train", "--config", str(config), "--num-processes", "2"]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=LAUNCH_SECONDS, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch.distributed.run --nproc_per_node 2" in result.stdout
    assert (tmp_path / "short" / "dreambooth_2.safetensors").is_file()


def test_class_images_are_made_split_across_the_processes(setup, tmp_path):
    make, _ = setup
    _, config = make("classes", max_train_steps=1, with_prior_preservation=True, num_class_images=4)
    result = torchrun(
        config,
        f'concepts=[{{"instance_data_dir": "{tmp_path / "instance"}", '
        f'"instance_prompt": "photo of zwx ring", "class_data_dir": "{tmp_path / "split"}", '
        '"class_prompt": "photo of a ring"}]',
        "sample_batch_size=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.stem for p in (tmp_path / "split").glob("*.png"))
    assert len(names) == 4
    assert sum(n.endswith("-0") for n in names) == 2 and sum(n.endswith("-1") for n in names) == 2


def test_one_process_in_process_creates_no_accelerate_state(make_settings):
    """The WebUI runs the trainer in its own process: accelerate's process-wide state must stay untouched."""
    from accelerate.state import PartialState

    Trainer(make_settings()).run()
    assert not PartialState._shared_state
