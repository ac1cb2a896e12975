"""``python tests/crash_runner.py train --config F``: the CLI, killed with SIGKILL at a chosen moment (tests only).

``DREAMBOOTH_TEST_KILL_AT``: ``step`` (inside the loss of step ``DREAMBOOTH_TEST_KILL_STEP``), ``checkpoint`` (half
way through writing that step's checkpoint), ``state`` (half way through writing the ``DREAMBOOTH_TEST_KILL_SAVE``-th
state), ``between_renames`` (in that save, after ``state`` became ``state.old``, before the new state took its
name).  The process kills itself, as
``kill -9`` from outside would at that moment: no handler, no clean-up runs.
"""

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth.cli import main

moment = os.environ.get("DREAMBOOTH_TEST_KILL_AT", "")
kill_step = int(os.environ.get("DREAMBOOTH_TEST_KILL_STEP", "0"))
kill_save = int(os.environ.get("DREAMBOOTH_TEST_KILL_SAVE", "0"))  # the N-th state save


def die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def half_written(path) -> None:
    Path(path).write_bytes(b"\0" * 1000)  # what a killed writer leaves: a partial file
    die()


if moment == "step":
    from dreambooth.train import loop

    original_loss = loop.Trainer._loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == kill_step:
            die()
        return original_loss(self, *args, **kwargs)

    loop.Trainer._loss = loss
elif moment in ("checkpoint", "state"):
    import safetensors.torch

    original_save = safetensors.torch.save_file

    state_saves = {"n": 0}

    def save_file(tensors, filename, *args, **kwargs):
        name = Path(filename)
        if moment == "checkpoint" and name.name.startswith(f".dreambooth_{kill_step}."):
            half_written(filename)
        if moment == "state" and name.parent.name.startswith(".state.") and name.name == "unet.safetensors":
            state_saves["n"] += 1
            if state_saves["n"] == kill_save:
                half_written(filename)
        return original_save(tensors, filename, *args, **kwargs)

    safetensors.torch.save_file = save_file
elif moment == "between_renames":
    from dreambooth.train import state

    original_swap = state._swap_in
    swaps = {"n": 0}

    def swap_in(temp, folder):
        swaps["n"] += 1
        if swaps["n"] == kill_save:
            folder.rename(folder.with_name(folder.name + ".old"))
            die()
        original_swap(temp, folder)

    state._swap_in = swap_in

sys.exit(main(sys.argv[1:]))
