"""LoRA rows of the benchmark (``bench --training-method lora``) beside diffusers' train_dreambooth_lora.py, without
the script itself: the command line it is given, the method check, the trained-parameter count, the table."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from dreambooth import bench, bench_lora
from dreambooth.bench_reference import (
    MODE,
    check_script_method,
    measure_reference,
    script_arguments,
    trained_parameters,
)


def _config(**changes):
    return {
        "scale": "tiny64",
        "prior": False,
        "train_text": False,
        "batch": 1,
        "steps": 8,
        "warmup": 2,
        "method": "lora",
        "rank": 8,
        "learning_rate": 1e-4,
        **changes,
    }


def _arguments(**changes):
    return script_arguments(_config(**changes), *[Path(p) for p in ("/m", "/i", "/c", "/o")], class_images=4)


def _value(args, flag):
    return args[args.index(flag) + 1]


def test_lora_script_gets_the_rank_and_the_learning_rate_of_the_bench():
    args = _arguments(rank=8, learning_rate=3e-4)
    assert _value(args, "--rank") == "8"
    assert float(_value(args, "--learning_rate")) == 3e-4  # the bench's LoRA rate, not full fine-tuning's 5e-6
    assert _value(args, "--mixed_precision") == "no" and _value(args, "--train_batch_size") == "1"
    assert _value(args, "--resolution") == "64" and "--center_crop" in args
    assert "--lora_dropout" not in args  # the script's default, 0: ours is 0 too in the bench


def test_lora_script_encodes_frozen_prompts_once_and_trains_text_adapters_when_asked():
    frozen = _arguments(train_text=False)
    assert "--pre_compute_text_embeddings" in frozen and "--train_text_encoder" not in frozen
    trained = _arguments(train_text=True, prior=True)
    # the script refuses both together; with the text encoder trained it encodes the prompts every step
    assert "--pre_compute_text_embeddings" not in trained and "--train_text_encoder" in trained
    assert "--with_prior_preservation" in trained and _value(trained, "--num_class_images") == "4"


def test_full_fine_tune_arguments_have_no_lora_options():
    config = {k: v for k, v in _config().items() if k not in ("method", "rank", "learning_rate")}
    args = script_arguments(config, *[Path("/x")] * 4, class_images=4)
    assert "--rank" not in args and "--pre_compute_text_embeddings" not in args
    assert float(_value(args, "--learning_rate")) == 5e-6


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="no diffusers reference script for the training method 'loha'"):
        _arguments(method="loha")


def test_a_script_of_the_other_method_is_refused(tmp_path):
    lora_script, full_script = tmp_path / "train_dreambooth_lora.py", tmp_path / "train_dreambooth.py"
    lora_script.write_text("from peft import LoraConfig\n")
    full_script.write_text("import torch\n")
    check_script_method(lora_script, "lora")
    check_script_method(full_script, "full")
    with pytest.raises(ValueError, match=r"trains a LoRA .* training method is full: pass .*train_dreambooth\.py"):
        check_script_method(lora_script, "full")
    with pytest.raises(ValueError, match=r"trains the full model .* method is lora: pass .*train_dreambooth_lora"):
        check_script_method(full_script, "lora")


def test_trained_parameters_counts_each_parameter_once():
    import torch

    a, b = torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))
    optimizer = torch.optim.AdamW([{"params": [a, b]}, {"params": [], "lr": 1.0}])
    assert trained_parameters(optimizer) == 17


# A stand-in for train_dreambooth_lora.py: it names peft's LoraConfig (as the real one), checks the arguments
# the bench gives and steps an optimizer over `--rank` x 10 parameters, as many times as asked.
FAKE_LORA_SCRIPT = """
import json, os, sys
import torch

# the real script builds peft's LoraConfig(r=args.rank, ...)
args = sys.argv[1:]
steps, rank = int(args[args.index("--max_train_steps") + 1]), int(args[args.index("--rank") + 1])
os.makedirs(args[args.index("--output_dir") + 1])
with open(os.environ["FAKE_LOG"], "w") as handle:
    json.dump({"argv": sys.argv}, handle)
adapter = torch.nn.Parameter(torch.ones(rank, 10))
optimizer = torch.optim.AdamW([adapter], lr=0.1)
for _ in range(steps):
    (adapter ** 2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
"""


def test_measure_reference_runs_a_lora_script_and_reports_what_it_trained(tmp_path, monkeypatch):
    script = tmp_path / "train_dreambooth_lora.py"
    script.write_text(textwrap.dedent(FAKE_LORA_SCRIPT))
    work = tmp_path / "work"
    (work / "model-bench-tiny").mkdir(parents=True)  # present: the fake script needs no model
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.json"))
    row = measure_reference(script, _config(rank=6, steps=6, warmup=2), work)
    assert row["mode"] == MODE and row["method"] == "lora" and row["rank"] == 6 and row["targets"] == "diffusers"
    assert row["trained_parameters"] == 6 * 10
    assert 0 < row["seconds_per_step"] < 5
    argv = json.loads((tmp_path / "log.json").read_text())["argv"]
    assert argv[argv.index("--rank") + 1] == "6"


def test_measure_reference_refuses_the_full_script_for_lora(tmp_path):
    script = tmp_path / "train_dreambooth.py"
    script.write_text("import torch\n")
    with pytest.raises(ValueError, match="training method is lora"):
        measure_reference(script, _config(), tmp_path / "work")
    assert not (tmp_path / "work").exists()  # refused before the model and images are written


def _rows():
    common = {
        "scale": "small128",
        "prior": True,
        "train_text": False,
        "peak_memory_gib": 1.0,
        "method": "lora",
        "rank": 16,
    }
    return [
        {**common, "mode": "default", "seconds_per_step": 0.2, "trained_parameters": 98_304, "targets": "kohya"},
        {**common, "mode": MODE, "seconds_per_step": 0.3, "trained_parameters": 65_536, "targets": "diffusers"},
    ]


def test_table_says_lora_rank_and_shows_the_trained_parameters(capsys):
    bench.print_table(_rows())
    lines = capsys.readouterr().out.splitlines()
    machine = next(line for line in lines if line.startswith("machine:"))
    assert machine.endswith("; LoRA rank 16, alpha 16 (diffusers layers), LoRA rank 16, alpha 16 (kohya layers)")
    assert any(" params " in line for line in lines)
    default = next(line for line in lines if " default " in line)
    script = next(line for line in lines if MODE in line)
    assert "98.3k" in default and "65.5k" in script
    assert default.rstrip().endswith("1.50x")  # vs script


def test_median_rows_keep_the_method_and_refuse_mixed_repeats():
    runs = [{"seconds_per_step": s, "peak_memory_gib": 1.0, "method": "lora", "rank": 16} for s in (0.1, 0.3)]
    (row,) = bench.median_rows({("tiny64", False, False, "default"): runs})
    assert row["method"] == "lora" and row["rank"] == 16 and row["seconds_per_step"] == pytest.approx(0.2)
    runs[1]["method"] = "full"
    with pytest.raises(ValueError, match="differ in method"):
        bench.median_rows({("tiny64", False, False, "default"): runs})


def test_cli_lora_options():
    from dreambooth.cli import build_parser

    args = build_parser().parse_args(["bench", "--training-method", "lora", "--network-rank", "4"])
    assert args.training_method == "lora" and args.network_rank == 4 and args.modes is None
    assert args.network_targets == "kohya"
    defaults = build_parser().parse_args(["bench"])
    assert defaults.training_method == "full" and defaults.network_rank == bench_lora.LORA_RANK
    assert build_parser().parse_args(["bench", "--network-targets", "diffusers"]).network_targets == "diffusers"


def test_lora_bench_refuses_the_floor_mode():
    from dreambooth.cli import build_parser

    args = build_parser().parse_args(["bench", "--training-method", "lora", "--modes", "default", "floor"])
    with pytest.raises(SystemExit, match="--modes floor do not exist for LoRA; use --modes default naive"):
        bench.run_bench(args)
    with pytest.raises(ValueError, match="does not exist for LoRA"):
        bench.measure_one({**_config(), "mode": "floor"})
