"""tools/gpu_check.sh and tools/gpu_bench.py (the GPU figures of docs/benchmarks.md) work on the CPU: a session lent a
GPU for a few minutes must not lose them to a typo or to a setting renamed since the tools were written."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def load_gpu_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", TOOLS / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_gpu_bench_dry_run_trains_and_estimates_on_the_cpu(tmp_path):
    gpu_bench = load_gpu_bench()
    json_path = tmp_path / "bench.json"
    argv = ["--device", "cpu", "--configs", "default", "default-xformers", "--steps", "2", "--warmup", "1"]
    assert gpu_bench.main([*argv, "--json", str(json_path)]) == 0
    default, xformers = json.loads(json_path.read_text())["rows"]
    assert default["config"] == "default" and default["steps"] == 2 and default["losses_finite"]
    assert default["seconds_per_step"] > 0 and default["estimate_peak_gib"] > 0
    assert set(xformers) == {"config", "skipped"}  # xformers needs CUDA: skipped with the reason, not failed


def test_every_configuration_names_settings_that_exist_or_the_lora_trainer():
    import dataclasses

    from dreambooth.settings import Settings

    fields = {f.name for f in dataclasses.fields(Settings)}
    for name, changes in load_gpu_bench().CONFIGS.items():
        unknown = set(changes) - fields
        # only the LoRA configurations may wait for their settings (they are skipped, with the reason, until then)
        assert not unknown or (name.startswith("lora") and unknown <= {"training_method", "network_rank"}), name


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_gpu_check_script_parses():
    subprocess.run(["bash", "-n", str(TOOLS / "gpu_check.sh")], check=True)
