"""The runner (one background job, a frozen snapshot, commands) and the standalone host (folders, path rules)."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path

import pytest

from dreambooth.host import Host, is_within
from dreambooth.runner import Runner, RunnerBusy
from dreambooth.settings import SettingsError

WAIT_SECONDS = 120


def wait_for(condition, timeout=WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def host(tmp_path, tiny_checkpoint):
    return Host(tmp_path / "models", allowed_roots=[tmp_path, tiny_checkpoint("sd1").parent])


class GatedHost(Host):
    """A host whose session waits on an event, so a test controls when the job may proceed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.exited = threading.Event()
        self.ended = []
        self.fail_inside = False

    @contextlib.contextmanager
    def session(self, settings, log):
        self.entered.set()
        try:
            assert self.gate.wait(WAIT_SECONDS)
            if self.fail_inside:
                raise RuntimeError("the GPU caught fire")
            yield None
        finally:
            self.exited.set()

    def job_ended(self, state, error):
        self.ended.append((state, error))


def test_a_job_runs_on_its_thread_and_the_snapshot_follows_it(host, make_settings):
    runner = Runner(host)
    assert runner.snapshot().state == "idle"
    job = runner.start(host.prepare(make_settings(max_train_steps=3)))
    assert runner.wait(WAIT_SECONDS)
    snap = runner.snapshot()
    assert snap.job_id == job and snap.state == "finished" and snap.progress.phase == "done"
    assert [step for step, _ in snap.losses] == [1, 2, 3]
    assert snap.progress.step == 3 and snap.progress.loss is not None  # figures survive the final events
    assert Path(snap.checkpoints[0]) == host.checkpoint_dir / "dreambooth_3.safetensors"
    assert any("saved" in line for line in snap.log)


@pytest.mark.slow
def test_the_snapshot_keeps_the_validation_losses_and_lists_the_best_checkpoint_once(host, make_settings, monkeypatch):
    from dreambooth.train.validation_loss import ValidationLoss

    values = iter([3.0, 2.0, 2.5, 1.0])
    monkeypatch.setattr(ValidationLoss, "compute", lambda self, run: next(values))
    runner = Runner(host)
    settings = make_settings(max_train_steps=4, validation_split=0.34, validation_steps=1, save_best=True)
    runner.start(host.prepare(settings))
    assert runner.wait(WAIT_SECONDS)
    snap = runner.snapshot()
    assert snap.state == "finished", snap.error
    assert snap.validation_losses == ((1, 3.0), (2, 2.0), (3, 2.5), (4, 1.0))
    assert snap.progress.validation_loss == 1.0  # carried through the final events
    names = [Path(p).name for p in snap.checkpoints]
    assert names == ["dreambooth_best.safetensors", "dreambooth_4.safetensors"]  # saved three times, listed once


def test_a_second_start_while_one_runs_is_refused(tmp_path, make_settings, tiny_checkpoint):
    host = GatedHost(tmp_path / "models", allowed_roots=[tmp_path, tiny_checkpoint("sd1").parent])
    runner = Runner(host)
    runner.start(host.prepare(make_settings()))
    assert host.entered.wait(WAIT_SECONDS)
    with pytest.raises(RunnerBusy, match="already running"):
        runner.start(host.prepare(make_settings()))
    host.gate.set()
    assert runner.wait(WAIT_SECONDS)
    assert runner.snapshot().state == "finished"
    runner.start(host.prepare(make_settings()))  # after the end a new job may start
    assert runner.wait(WAIT_SECONDS) and runner.snapshot().job_id == 2


def test_cancel_stops_the_job_and_leaves_a_resumable_state(host, make_settings):
    runner = Runner(host)
    assert runner.cancel() is False  # nothing runs
    runner.start(host.prepare(make_settings(max_train_steps=200)))
    assert wait_for(lambda: runner.snapshot().losses)
    assert runner.cancel() is True
    assert runner.wait(WAIT_SECONDS)
    snap = runner.snapshot()
    assert snap.state == "cancelled" and snap.progress.step < 200
    state_dir = Path(host.run_dir("dreambooth")) / "state"
    assert (state_dir / "state.json").is_file()
    assert host.saved_states() == [str(state_dir)]  # offered in the tab's resume list


def test_save_now_and_sample_now_reach_the_trainer(host, make_settings):
    runner = Runner(host)
    assert runner.save_now() is False and runner.sample_now() is False
    runner.start(host.prepare(make_settings(max_train_steps=400, n_save_sample=1)))
    assert wait_for(lambda: runner.snapshot().losses)
    assert runner.save_now() and runner.sample_now()
    assert wait_for(lambda: runner.snapshot().samples and len(runner.snapshot().checkpoints) >= 1)
    runner.cancel()
    assert runner.wait(WAIT_SECONDS)
    assert runner.snapshot().state == "cancelled"


def test_a_failure_inside_the_session_ends_the_job_with_its_message(tmp_path, make_settings, tiny_checkpoint):
    host = GatedHost(tmp_path / "models", allowed_roots=[tmp_path, tiny_checkpoint("sd1").parent])
    host.fail_inside = True
    host.gate.set()
    runner = Runner(host)
    runner.start(host.prepare(make_settings()))
    assert runner.wait(WAIT_SECONDS)
    snap = runner.snapshot()
    assert snap.state == "failed" and "the GPU caught fire" in snap.error
    assert host.exited.is_set() and host.ended == [("failed", snap.error)]
    assert any("error:" in line for line in snap.log)


def test_invalid_settings_do_not_start_and_say_why(host, make_settings):
    runner = Runner(host)
    with pytest.raises(SettingsError) as error:
        runner.start(host.prepare(make_settings(resolution=65)))
    assert any("multiple of 8" in p for p in error.value.problems)
    assert runner.snapshot().state == "idle"


def test_the_host_puts_outputs_in_its_own_folders_whatever_the_request_says(host, make_settings, tmp_path):
    prepared = host.prepare(make_settings(output_dir="/etc", checkpoint_dir="/usr/lib", model_name="dog"))
    assert prepared.output_dir == str(host.runs_dir / "dog")
    assert prepared.checkpoint_dir == str(host.checkpoint_dir)
    assert host.check_settings(prepared) == []
    escaping = host.prepare(make_settings(logging_dir="/etc/logs"))
    assert any("logging_dir" in p and "may write to" in p for p in host.check_settings(escaping))


def test_files_outside_the_allowed_roots_are_refused(tmp_path, make_settings, tiny_checkpoint):
    host = Host(tmp_path / "models", allowed_roots=[tiny_checkpoint("sd1").parent])  # not tmp_path: datasets out
    problems = host.check_settings(host.prepare(make_settings(test_prompts_file="/etc/passwd")))
    assert any(p.startswith("concept 1 instance_data_dir") and "outside" in p for p in problems)
    assert any(p.startswith("test_prompts_file: '/etc/passwd'") for p in problems)
    assert not any(p.startswith("pretrained_model_name_or_path") for p in problems)


def test_is_within_resolves_dot_dot_and_links(tmp_path):
    root = (tmp_path / "root").resolve()
    (root / "inside").mkdir(parents=True)
    assert is_within(root / "inside", [root])
    assert not is_within(root / ".." / "elsewhere", [root])
    link = root / "link"
    link.symlink_to("/etc")
    assert not is_within(link / "passwd", [root])


def test_checkpoints_are_listed_from_the_checkpoint_folder(host):
    (host.checkpoint_dir / "sub").mkdir(parents=True)
    for name in ("b.safetensors", "sub/a.ckpt", "notes.txt"):
        (host.checkpoint_dir / name).write_bytes(b"x")
    assert [c.title for c in host.list_checkpoints()] == ["b.safetensors", "sub/a.ckpt"]


def test_settings_are_saved_per_model_and_the_last_used_come_back(host, make_settings):
    settings = host.prepare(make_settings(model_name="dog", learning_rate=3e-6))
    host.save_settings(settings)
    assert host.saved_settings() == ["dog"]
    assert host.load_settings("dog").learning_rate == 3e-6
    with pytest.raises(ValueError, match="plain name"):
        host.save_settings(settings, name="../escape")
    assert host.last_used() is None
    host.remember_last_used(settings)
    assert Host(host.models_dir, allowed_roots=[]).last_used() == settings  # a new process finds them
    (host.data_dir / "last_used.json").write_text("{broken")
    assert host.last_used() is None  # a broken file never stops the tab from opening


def test_a_missing_required_package_and_a_too_new_diffusers_are_named_with_the_fix(host, monkeypatch):
    import importlib.util
    from importlib import metadata

    real_spec, real_version = importlib.util.find_spec, metadata.version
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "yaml" else real_spec(n, *a))
    versions = {"diffusers": "0.35.2", "transformers": "4.30.2"}
    monkeypatch.setattr(metadata, "version", lambda n: versions.get(n) or real_version(n))
    notes = host.environment_notes()
    assert any("PyYAML is missing" in n and "pip install" in n for n in notes)
    assert any("diffusers is too new" in n and "diffusers>=0.29,<0.32" in n for n in notes)
    versions["diffusers"] = "0.31.0"
    assert not any("too new" in n for n in host.environment_notes())


def test_missing_optional_packages_are_reported_not_fatal(host, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xformers" else real(name, *a))
    notes = host.environment_notes()
    assert any("xformers" in n for n in notes)


def test_sampling_events_keep_the_step_line():
    from dreambooth.events import Progress
    from dreambooth.runner import _carry_forward

    training = Progress(phase="training", step=120, total_steps=240, loss=0.9)
    sampling = _carry_forward(training, Progress(phase="sampling", message="making samples at step 120"))
    assert (sampling.step, sampling.total_steps, sampling.loss) == (120, 240, 0.9)
    caching = _carry_forward(sampling, Progress(phase="caching", step=1, total_steps=3))
    assert (caching.step, caching.total_steps) == (1, 3)


def test_a_failure_in_a_step_ends_the_job_with_the_message_and_the_state_to_resume(host, make_settings, monkeypatch):
    from dreambooth.train.loop import Trainer

    original = Trainer._loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("a bug in step 3")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_loss", loss)
    runner = Runner(host)
    runner.start(host.prepare(make_settings(max_train_steps=5)))
    assert runner.wait(WAIT_SECONDS)
    snap = runner.snapshot()
    state_dir = Path(host.run_dir("dreambooth")) / "state"
    assert snap.state == "failed" and snap.progress.phase == "failed"
    assert snap.error.startswith("Training stopped in step 3 of 5. RuntimeError: a bug in step 3")
    assert f"A resumable state of step 2 is saved in {state_dir}." in snap.error
    assert host.saved_states() == [str(state_dir)]  # offered in the tab's resume list


def test_the_resume_list_offers_a_state_left_between_the_renames_of_a_save(host):
    """A kill between ``state`` -> ``state.old`` and the new state's rename: no ``state`` folder, yet the run's
    newest complete state (here the one under its temporary name) is offered as ``runs/NAME/state``."""
    import json

    from dreambooth.train.state import find_state

    run = host.runs_dir / "ring"

    def complete_state(folder, step):
        folder.mkdir(parents=True)
        for name in ("unet.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"):
            (folder / name).write_bytes(b"x")
        (folder / "state.json").write_text(json.dumps({"version": 1, "step": step, "modules": ["unet"]}))

    complete_state(run / "state.old", 10)
    complete_state(run / ".state.a1b2", 20)
    assert host.saved_states() == [str(run / "state")]
    assert find_state(run / "state") == run / ".state.a1b2"
