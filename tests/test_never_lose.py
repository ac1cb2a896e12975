"""Nothing is lost on a failure: an exception in a step, out of memory, a full disk, an interrupted state rotation.

Each failure leaves a resumable state and intact earlier checkpoints, ends in one message that says where the state
is and how to resume, and resuming reaches the uninterrupted run's weights bit for bit (CPU).  Kills (SIGKILL) at
several moments are in tests/test_crash.py.
"""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path

import pytest
import torch

from dreambooth.models.files import read_state_dict
from dreambooth.train.failures import DiskFull, TrainingFailed
from dreambooth.train.loop import Trainer
from dreambooth.train.state import find_state, state_step

STEPS = 6
_straight: dict[str, dict] = {}


def unet_weights(components) -> dict:
    return {k: v.detach().clone() for k, v in components.unet.state_dict().items()}


def straight_weights(make_settings, tmp_path) -> dict:
    """The uninterrupted run's UNet (the same settings in every test here, so it is computed once)."""
    if "unet" not in _straight:
        trainer = Trainer(make_settings(output_dir=str(tmp_path / "straight"), max_train_steps=STEPS))
        trainer.run()
        _straight["unet"] = unet_weights(trainer.components)
    return _straight["unet"]


def resume(make_settings, out: Path, state: Path, **changes) -> Trainer:
    trainer = Trainer(make_settings(output_dir=str(out), max_train_steps=STEPS, resume_from=str(state), **changes))
    result = trainer.run()
    assert result.step == STEPS
    return trainer


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def failing_loss(monkeypatch, at_call: int, error: BaseException, nan_at: int | None = None) -> None:
    """Trainer._loss raises ``error`` at its ``at_call``-th call (one call per step here)."""
    original = Trainer._loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise error
        total, instance, prior = original(self, *args, **kwargs)
        if calls["n"] == nan_at:
            total = total * float("nan")
        return total, instance, prior

    monkeypatch.setattr(Trainer, "_loss", loss)


# ------------------------------------------------------------------------------------------- exception in a step


def test_an_exception_in_a_step_keeps_a_state_of_the_last_step_and_resume_is_exact(
    make_settings, tmp_path, monkeypatch
):
    straight = straight_weights(make_settings, tmp_path)
    out = tmp_path / "failed"
    failing_loss(monkeypatch, 4, RuntimeError("a bug in step 4"))
    with pytest.raises(TrainingFailed) as failed:
        Trainer(make_settings(output_dir=str(out), max_train_steps=STEPS)).run()  # no periodic saves (the default)
    message = str(failed.value)
    assert "Training stopped in step 4 of 6. RuntimeError: a bug in step 4" in message
    assert f"A resumable state of step 3 is saved in {out / 'state'}." in message
    assert f"--set resume_from={out / 'state'}" in message and "'Resume from'" in message
    assert failed.value.state_dir == out / "state" and state_step(out / "state") == 3
    monkeypatch.undo()
    assert_same(unet_weights(resume(make_settings, out, out / "state").components), straight)


def test_no_state_is_saved_from_weights_that_went_nan(make_settings, tmp_path, monkeypatch):
    out = tmp_path / "nan"
    # a checkpoint + state at step 2, a NaN loss in step 3 (its update makes the weights NaN), a failure in step 4
    failing_loss(monkeypatch, 4, RuntimeError("after the NaN"), nan_at=3)
    with pytest.raises(TrainingFailed) as failed:
        Trainer(make_settings(output_dir=str(out), max_train_steps=STEPS, save_model_every_n_steps=2)).run()
    message = str(failed.value)
    assert "The weights are not finite (NaN or inf) after step 3, so they were not saved" in message
    assert f"the last resumable state is {out / 'state'} (step 2)" in message
    assert state_step(out / "state") == 2 and failed.value.state_dir == out / "state"


def test_out_of_memory_gets_its_own_message_and_a_state(make_settings, tmp_path, monkeypatch):
    """An OutOfMemoryError raised from inside the UNet's forward (as CUDA would) in step 3."""
    out = tmp_path / "oom"
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    trainer = Trainer(make_settings(output_dir=str(out), max_train_steps=STEPS, train_text_encoder=True))
    original_load = Trainer._load

    def load(self, device):
        components = original_load(self, device)
        components.unet.register_forward_pre_hook(hook)
        return components

    monkeypatch.setattr(Trainer, "_load", load)
    with pytest.raises(TrainingFailed) as failed:
        trainer.run()
    message = str(failed.value)
    assert "Training stopped in step 3 of 6. Out of GPU memory:" in message
    assert "the model's weights take" in message and "CUDA out of memory" not in message
    for advice in ("low_memory on", "gradient_checkpointing on", "mixed_precision fp16 or bf16", "adamw_8bit"):
        assert advice in message
    assert "train_text_encoder off" in message and "a smaller train_batch_size" not in message  # batch is 1
    assert f"A resumable state of step 2 is saved in {out / 'state'}" in message


def test_out_of_memory_message_names_only_settings_that_would_lower_memory(make_settings):
    from dreambooth.train.failures import out_of_memory_message

    settings = make_settings(train_batch_size=4, resolution=768, low_memory=True, gradient_checkpointing=True)
    message = out_of_memory_message(settings, peak_bytes=7 * 2**30, total_bytes=8 * 2**30, model_bytes=2**31)
    assert message.startswith("Out of GPU memory: peak 7.00 GiB allocated of the GPU's 8.00 GiB; the model's weights")
    assert "2.00 GiB" in message
    assert "a smaller train_batch_size" in message and "a lower resolution" in message
    assert "low_memory on" not in message and "gradient_checkpointing on" not in message  # already on


def test_the_cli_prints_one_message_and_the_resume_command(make_settings, tmp_path, monkeypatch, capsys):
    from dreambooth.cli import main

    out = tmp_path / "cli"
    config = tmp_path / "config.json"
    make_settings(output_dir=str(out), max_train_steps=3).save(config)
    failing_loss(monkeypatch, 3, RuntimeError("a bug in step 3"))
    assert main(["train", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: Training stopped in step 3 of 3. RuntimeError: a bug in step 3" in err
    assert f"resume: python -m dreambooth train --config {config} --set resume_from={out / 'state'}" in err
    failing_loss(monkeypatch, 1, RuntimeError("a bug in step 1"))
    assert main(["train", "--config", str(config), "--debug", "--set", "max_train_steps=3"]) == 1
    assert "Traceback" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- full disk


@pytest.mark.parametrize("which", ["checkpoint", "state"])
def test_a_full_disk_keeps_the_earlier_checkpoint_and_state_and_says_so(make_settings, tmp_path, monkeypatch, which):
    """ENOSPC half way through writing step 4's checkpoint (or state); saves at 2 and 4."""
    import safetensors.torch

    straight = straight_weights(make_settings, tmp_path)
    out = tmp_path / "full"
    original = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        name = Path(filename)
        full = name.name.startswith(".dreambooth_4.") if which == "checkpoint" else name.parent.name.startswith(".")
        if full and (which == "checkpoint" or (out / "dreambooth_4.safetensors").exists()):
            name.write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(TrainingFailed) as failed:
        Trainer(make_settings(output_dir=str(out), max_train_steps=STEPS, save_model_every_n_steps=2)).run()
    assert isinstance(failed.value.__cause__, DiskFull)
    message = str(failed.value)
    what = "the checkpoint of step 4" if which == "checkpoint" else "the training state of step 4"
    assert f"The disk is full: {what} needs about " in message
    assert re.search(rf"needs about [1-9][\d.]* MiB in {re.escape(str(out))} \([\d.]+ [MG]iB free\)", message)
    last_good = out / ("dreambooth_2.safetensors" if which == "checkpoint" else "dreambooth_4.safetensors")
    assert f"the last good checkpoint is {last_good}" in message
    assert f"the last resumable state is {out / 'state'} (step 2)" in message
    assert not list(out.glob(".*")), "no temporary file or folder is left"
    assert read_state_dict(out / "dreambooth_2.safetensors")[0]  # the earlier checkpoint is intact
    monkeypatch.undo()
    assert_same(unet_weights(resume(make_settings, out, out / "state").components), straight)


# ------------------------------------------------------------------------------------------- state rotation


def tiny_training_objects():
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters())
    return {"unet": module}, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_an_exception_between_the_renames_of_a_state_save_leaves_the_previous_state(tmp_path, monkeypatch):
    from dreambooth.train.state import save_state

    folder = tmp_path / "state"
    modules, optimizer, scheduler = tiny_training_objects()
    save_state(folder, 1, modules, optimizer, scheduler, {})
    original = Path.rename

    def rename(self, target):
        result = original(self, target)
        if self.name == "state":
            raise OSError("stopped between the renames")
        return result

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="between the renames"):
        save_state(folder, 2, modules, optimizer, scheduler, {})
    monkeypatch.undo()
    assert find_state(folder) is not None and state_step(find_state(folder)) == 1


def test_resume_finds_the_newest_complete_state_after_a_kill_between_the_renames(make_settings, tmp_path):
    """What a kill leaves in the rotation window: ``state.old``, a complete new state still under its temporary
    name, and a half-written one of a later save; no ``state``.  Resume from ``.../state`` and from the run
    folder takes the complete new one."""
    import shutil

    from dreambooth.events import Callbacks, Commands

    straight = straight_weights(make_settings, tmp_path)
    out = tmp_path / "window"

    class CancelAt(Callbacks):
        def __init__(self, commands, step):
            self.commands, self.step = commands, step

        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == self.step:
                self.commands.cancel()

    def run_until(step, **changes):
        commands = Commands()
        settings = make_settings(output_dir=str(out), max_train_steps=STEPS, **changes)
        return Trainer(settings, callbacks=CancelAt(commands, step), commands=commands).run()

    run_until(2)
    shutil.copytree(out / "state", tmp_path / "step2")
    run_until(3, resume_from=str(out / "state"))
    (out / "state").rename(out / ".state.k1ll3d")  # the new state, complete, not yet renamed
    (tmp_path / "step2").rename(out / "state.old")  # the previous one, renamed by the first rename
    shutil.copytree(out / ".state.k1ll3d", out / ".state.h4lf")
    (out / ".state.h4lf" / "state.json").write_text(json.dumps({"version": 1, "step": 5, "modules": ["unet"]}))
    (out / ".state.h4lf" / "optimizer.pt").unlink()  # a later save killed while writing: not complete
    assert not (out / "state").exists()
    assert find_state(out / "state") == out / ".state.k1ll3d" == find_state(out)
    assert make_settings(output_dir=str(out), max_train_steps=STEPS, resume_from=str(out / "state")).validate() == []
    assert_same(unet_weights(resume(make_settings, out, out / "state").components), straight)
    assert sorted(p.name for p in out.iterdir() if "state" in p.name) == ["state"]  # leftovers cleaned


# --------------------------------------------------------------------------------------------- retention


def test_save_total_limit_keeps_the_newest_and_the_states_checkpoint(make_settings, tmp_path):
    out = tmp_path / "limit"
    Trainer(make_settings(output_dir=str(out), max_train_steps=2)).run()  # state at step 2 (dreambooth_2)
    result = Trainer(
        make_settings(
            output_dir=str(out),
            max_train_steps=5,
            save_model_every_n_steps=1,
            save_training_state=False,
            save_total_limit=2,
            resume_from=str(out / "state"),
        )
    ).run()
    names = sorted(p.name for p in out.glob("dreambooth_*"))
    kept = ["dreambooth_2", "dreambooth_4", "dreambooth_5"]  # the state's (step 2) and the newest two
    assert names == sorted([f"{n}.safetensors" for n in kept] + [f"{n}.yaml" for n in kept])  # 3's yaml gone too
    assert [p.name for p in result.checkpoints] == ["dreambooth_4.safetensors", "dreambooth_5.safetensors"]


def test_prune_checkpoints_removes_the_oldest_with_their_yaml(tmp_path):
    from dreambooth.train.retention import prune_checkpoints

    for step in (5, 10, 15, 20):
        (tmp_path / f"run_{step}.safetensors").write_bytes(b"x")
        (tmp_path / f"run_{step}.yaml").write_text("y")
    (tmp_path / "run_final.safetensors").write_bytes(b"x")  # not NAME_STEP: never touched
    (tmp_path / "other_1.safetensors").write_bytes(b"x")  # another model name
    assert prune_checkpoints(tmp_path, "run", 0) == []
    deleted = prune_checkpoints(tmp_path, "run", 2, protected={tmp_path / "run_5.safetensors"})
    assert deleted == [tmp_path / "run_10.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "other_1.safetensors",
        "run_15.safetensors",
        "run_15.yaml",
        "run_20.safetensors",
        "run_20.yaml",
        "run_5.safetensors",
        "run_5.yaml",
        "run_final.safetensors",
    ]


# --------------------------------------------------------------------------------------- epoch under processes


def test_progress_epoch_counts_global_batches(make_settings, monkeypatch):
    """Two processes of batch 1 draw batches of 2 samples: with 3 images, steps 1-4 are in epochs 0, 0, 1, 2."""
    from dreambooth.events import Callbacks
    from dreambooth.train import loop
    from dreambooth.train.distributed import Single

    class FirstOfTwo(Single):
        world_size = 2

    monkeypatch.setattr(loop, "make_distributed", lambda name, device: FirstOfTwo(torch.device("cpu")))
    epochs = []

    class Record(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training":
                epochs.append(progress.epoch)

    Trainer(make_settings(max_train_steps=4), callbacks=Record()).run()
    assert epochs == [0, 0, 1, 2]


# ------------------------------------------------------------------------------------- low_memory


def test_low_memory_help_says_what_it_does():
    from dreambooth.settings import fields

    help_text = next(f for f in fields() if f.name == "low_memory").metadata["help"]
    assert "fits gpu_memory_gb" in help_text and "memory estimate" in help_text  # Fit my GPU (tests/test_fit.py)
    for claim in ("fp16/bf16", "fp32 weights are restored"):  # the frozen modules' precision no longer depends on it
        assert claim not in help_text
