"""Pickled checkpoints are loaded without running code; writes are atomic."""

from __future__ import annotations

import os

import pytest
import torch

from dreambooth.errors import UnsafeCheckpointError
from dreambooth.models import files
from dreambooth.models.components import load_components, save_single_file


class Payload:
    """Unpickling this runs ``os.system``: a checkpoint that carries it must never be executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("zip_format", [True, False])
def test_malicious_ckpt_is_refused_and_payload_does_not_run(tmp_path, zip_format):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "evil.ckpt"
    torch.save(
        {"state_dict": {"w": torch.zeros(1)}, "x": Payload(marker)},
        path,
        _use_new_zipfile_serialization=zip_format,
    )
    with pytest.raises(UnsafeCheckpointError, match="refused to load") as error:
        load_components(path)
    assert str(path) in str(error.value)
    assert not marker.exists()
    # The test is real: an unrestricted load of the same file does run the payload.
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_ckpt_round_trip_loads_our_own_file(tiny_checkpoint, tmp_path):
    ckpt = save_single_file(load_components(tiny_checkpoint("sd1")), tmp_path / "model.ckpt")[0]
    assert load_components(ckpt).arch.family == "sd1"


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    destination = tmp_path / "model.safetensors"
    destination.write_bytes(b"previous content")

    def failing_save(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    with pytest.raises(OSError, match="No space left"):
        files.write_state_dict({"w": torch.zeros(2)}, destination)
    assert destination.read_bytes() == b"previous content"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_loading_patches_nothing_global(tiny_checkpoint, tmp_path):
    """Importing the layer and loading a .ckpt leave torch.load and pickle's unpickler as they were."""
    import subprocess
    import sys

    ckpt = save_single_file(load_components(tiny_checkpoint("sd1")), tmp_path / "model.ckpt")[0]
    script = (
        "import pickle, torch\n"
        "before = (torch.load, pickle.Unpickler, pickle.load)\n"
        "from dreambooth.models.components import load_components\n"
        f"load_components({str(ckpt)!r})\n"
        "print((torch.load, pickle.Unpickler, pickle.load) == before)\n"
    )
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "True"
