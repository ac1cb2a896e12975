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


@pytest.mark.parametrize("variant", ["sd1", "sd2-v", "sdxl"])
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


def test_demo_trains_and_leaves_its_outputs(tmp_path):
    import re

    result = run_cli("demo", "--out", str(tmp_path / "demo"), "--steps", "120", "--vae-steps", "20")
    assert result.returncode == 0, result.stderr
    output = tmp_path / "demo" / "output"
    assert (output / "demo_120.safetensors").is_file() and (output / "loss.png").is_file()
    assert len(list((output / "samples" / "step_000120").glob("*.png"))) == 4
    first, last = map(float, re.search(r"mean loss ([\d.]+) \(first quarter\) -> ([\d.]+)", result.stdout).groups())
    assert last < first


def test_train_from_a_settings_file_matches_the_library(make_settings, tmp_path):
    """A settings file trains the same weights through the CLI as through Trainer in-process."""
    from dreambooth.train.loop import Trainer

    settings = make_settings(output_dir=str(tmp_path / "cli"), with_prior_preservation=True)
    config = settings.save(tmp_path / "settings.json")
    result = run_cli("train", "--config", str(config), "--set", "max_train_steps=3")
    assert result.returncode == 0, result.stderr
    assert "finished at step 3 of 3" in result.stdout
    cli_file = tmp_path / "cli" / "dreambooth_3.safetensors"
    assert f"checkpoint: {cli_file}" in result.stdout
    library = Trainer(
        make_settings(output_dir=str(tmp_path / "lib"), with_prior_preservation=True, max_train_steps=3)
    ).run()
    a, b = read_state_dict(cli_file)[0], read_state_dict(library.checkpoints[-1])[0]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_train_with_a_bad_config_lists_every_problem(tmp_path):
    config = tmp_path / "bad.json"
    config.write_text('{"schema_version": 2, "resolution": 100, "concepts": [{"instance_prompt": ""}]}')
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 2
    for words in ("resolution is 100", "instance_prompt is empty", "output_dir is empty"):
        assert words in result.stderr
    config.write_text('{"learnin_rate": 1}')
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 2 and "unknown setting 'learnin_rate'" in result.stderr


def scripted_estimate_module(monkeypatch, seen: list):
    """A stand-in for dreambooth.memory.estimate whose figure follows resolution and checkpointing (the real dry
    run is tested in tests/test_estimate.py; here the command's parsing and output are)."""
    import types

    from dreambooth.memory import fit

    def estimate(settings, arch=None, processes=1):
        seen.append((settings, arch, processes))
        total = (settings.resolution / 512) ** 2 * 8 * 2**30 * (0.5 if settings.gradient_checkpointing else 1.0)
        return types.SimpleNamespace(
            total_bytes=int(total), breakdown={"activations": int(total)}, constants={}, arch_name="SD 1.x"
        )

    module = types.ModuleType("dreambooth.memory.estimate")
    module.estimate = estimate
    module.ARCH_SHORTCUTS = {"sd15": "the SD 1.5 architecture", "sd21": "the SD 2.1 architecture"}
    module.format_estimate = lambda e: f"FORMATTED peak {e.total_bytes / 2**30:.2f} GiB"
    monkeypatch.setitem(sys.modules, "dreambooth.memory.estimate", module)
    monkeypatch.setattr(fit, "_default_estimate", estimate)


def test_estimate_prints_the_estimate_and_what_would_fit(make_settings, tmp_path, monkeypatch, capsys):
    from dreambooth.cli import main

    seen: list = []
    scripted_estimate_module(monkeypatch, seen)
    config = make_settings(resolution=512).save(tmp_path / "settings.json")
    argv = ["estimate", "--config", str(config), "--set", "resolution=768", "--gpu-memory", "12", "--processes", "2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FORMATTED peak 18.00 GiB" in out  # (768/512)^2 x 8 GiB: --set reached the estimate
    assert "Does not fit a 12.0 GiB GPU: 6.00 GiB too much" in out
    assert "What would fit 12.0 GiB (cheapest first):\n  1. gradient_checkpointing on: 9.00 GiB" in out
    assert "20-30% slower" in out and "resolution 640: 12.50" not in out and "2. resolution 512: 8.00 GiB" in out
    assert {processes for _, _, processes in seen} == {2}

    seen.clear()
    assert main(["estimate", "--arch", "sd15", "--gpu-memory", "12"]) == 0  # default settings: 512 px, 8 GiB
    out = capsys.readouterr().out
    assert "Fits a 12.0 GiB GPU (4.00 GiB to spare)" in out and "What would fit" not in out
    assert seen[0][1] == "the SD 1.5 architecture" and len(seen) == 1

    assert main(["estimate", "--arch", "sd15", "--gpu-memory", "6", "--set", "low_memory=true"]) == 0
    assert (
        "low_memory (fit my GPU) chooses: mixed_precision bf16, gradient_checkpointing on: 4.00 GiB"
        in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "argv, words",
    [
        (["estimate"], "estimate needs a base model"),
        (["estimate", "--arch", "sd15", "--gpu-memory", "-1"], "--gpu-memory -1: give the GPU's size in GB"),
        (["estimate", "--arch", "sd15", "--processes", "0"], "--processes 0"),
        (["estimate", "--arch", "sd15", "--set", "resolution=big"], "'resolution' must be a whole number"),
        (["estimate", "--config", "missing.json"], "missing.json: cannot read the settings file"),
        (["estimate", "--arch", "sd99"], "--arch sd99: not a known architecture; one of sd15, sd21."),
    ],
)
def test_estimate_bad_input_is_one_sentence(argv, words, monkeypatch, capsys):
    from dreambooth.cli import main

    scripted_estimate_module(monkeypatch, [])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.slow  # about a minute: several dry runs
def test_estimate_with_the_real_dry_run_of_a_tiny_model(make_settings, tmp_path):
    """End to end: the dry run of dreambooth/memory/estimate.py on the tiny model's file, a GPU too small for it."""
    config = make_settings(with_prior_preservation=True).save(tmp_path / "settings.json")
    result = run_cli("estimate", "--config", str(config), "--gpu-memory", "0.5")
    assert result.returncode == 0, result.stderr
    assert "Estimated GPU memory (SD 1.x" in result.stdout and "Does not fit a 0.5 GiB GPU" in result.stdout
    assert "What would fit 0.5 GiB" in result.stdout or "Nothing this tool knows makes it fit" in result.stdout
    fitted = run_cli("estimate", "--config", str(config), "--gpu-memory", "0.5", "--set", "low_memory=true")
    assert "low_memory (fit my GPU) chooses:" in fitted.stdout, fitted.stderr


def test_estimate_of_an_sd2_file_named_by_set(tiny_checkpoint):
    """No config: the base model given with --set; an SD 2.x 768 (v-prediction) single file, read from its header."""
    path = tiny_checkpoint("sd2-v")
    result = run_cli("estimate", "--set", f"pretrained_model_name_or_path={path}", "--set", "resolution=64")
    assert result.returncode == 0, result.stderr
    assert "Estimated GPU memory (SD 2.x 768 (v-prediction)" in result.stdout
    assert "optimizer states" in result.stdout and "total" in result.stdout
