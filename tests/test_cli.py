"""``python -m dreambooth convert`` both ways, in the environment running the tests."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dreambooth.models.files import read_state_dict

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dreambooth", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("variant", ["sd1", "sd2-v"])
def test_convert_both_ways(tiny_checkpoint, tmp_path, variant):
    source = tiny_checkpoint(variant)
    folder = tmp_path / "diffusers"
    result = run_cli("convert", str(source), str(folder))
    assert result.returncode == 0, result.stderr
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    back = tmp_path / "back.safetensors"
    result = run_cli("convert", str(folder), str(back), "--half")
    assert result.returncode == 0, result.stderr
    assert back.with_suffix(".yaml").is_file()  # tiny models need their yaml in the WebUI
    original, written = read_state_dict(source)[0], read_state_dict(back)[0]
    assert set(original) == set(written)
    for key, tensor in original.items():
        assert written[key].dtype == (torch.float16 if tensor.is_floating_point() else tensor.dtype)
        assert torch.equal(written[key], tensor.half() if tensor.is_floating_point() else tensor), key


def test_convert_file_to_ckpt_and_info(tiny_checkpoint, tmp_path):
    target = tmp_path / "model.ckpt"
    result = run_cli("convert", str(tiny_checkpoint("sd2-v")), str(target))
    assert result.returncode == 0, result.stderr
    result = run_cli("info", str(target))
    assert result.returncode == 0, result.stderr
    assert "SD 2.x 768 (v-prediction)" in result.stdout


def test_convert_refuses_to_overwrite_and_writes_nothing_on_bad_input(tiny_checkpoint, tmp_path):
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"keep me")
    result = run_cli("convert", str(tiny_checkpoint("sd1")), str(existing))
    assert result.returncode == 2 and "already exists" in result.stderr
    assert existing.read_bytes() == b"keep me"

    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_checkpoint("sd1").read_bytes()[:5000])
    out = tmp_path / "out"
    result = run_cli("convert", str(truncated), str(out))
    assert result.returncode == 2
    assert "truncated.safetensors" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.safetensors", "truncated.safetensors"]


def test_demo_runs(tmp_path):
    result = run_cli("demo", "--out", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "demo" / "sample.png").is_file()
    assert "exact: True" in result.stdout
