"""The harness that benchmarks diffusers' train_dreambooth.py (``bench --reference``), without the script itself."""

from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path

import pytest

from dreambooth import bench
from dreambooth.bench_reference import MODE, measure_reference, script_arguments, steady_step_seconds
from dreambooth.settings import Settings


def _config(**changes):
    return {"scale": "tiny64", "prior": False, "train_text": False, "batch": 1, "steps": 8, "warmup": 2, **changes}


def _arguments(**changes):
    paths = [Path("/m"), Path("/i"), Path("/c"), Path("/o")]
    return script_arguments(_config(**changes), *paths, class_images=4)


def _value(args, flag):
    return args[args.index(flag) + 1]


def test_arguments_prior_off():
    args = _arguments()
    assert _value(args, "--pretrained_model_name_or_path") == "/m"
    assert _value(args, "--instance_data_dir") == "/i"
    assert _value(args, "--output_dir") == "/o"
    assert _value(args, "--instance_prompt") == bench.INSTANCE_PROMPT
    assert _value(args, "--resolution") == "64"
    assert _value(args, "--train_batch_size") == "1"
    assert _value(args, "--max_train_steps") == "8"
    assert int(_value(args, "--checkpointing_steps")) > 8
    assert _value(args, "--mixed_precision") == "no"
    assert _value(args, "--dataloader_num_workers") == "0"
    assert "--center_crop" in args
    for flag in ("--with_prior_preservation", "--class_data_dir", "--class_prompt", "--train_text_encoder"):
        assert flag not in args
    assert "--report_to" not in args and "--validation_prompt" not in args


def test_arguments_follow_our_defaults():
    args, ours = _arguments(), Settings()
    assert float(_value(args, "--learning_rate")) == ours.learning_rate == 5e-6
    assert _value(args, "--lr_scheduler") == ours.lr_scheduler == "constant"
    assert int(_value(args, "--seed")) == ours.seed
    assert float(_value(args, "--max_grad_norm")) == ours.max_grad_norm
    assert float(_value(args, "--adam_weight_decay")) == ours.adam_weight_decay


def test_arguments_prior_on_and_text_trained():
    args = _arguments(prior=True, train_text=True, scale="small128")
    assert "--with_prior_preservation" in args
    assert _value(args, "--class_data_dir") == "/c"
    assert _value(args, "--class_prompt") == bench.CLASS_PROMPT
    assert _value(args, "--num_class_images") == "4"
    assert float(_value(args, "--prior_loss_weight")) == 1.0
    assert "--train_text_encoder" in args
    assert _value(args, "--resolution") == "128"


def test_explicit_model_and_resolution():
    config = {k: v for k, v in _config().items() if k != "scale"}
    args = script_arguments({**config, "model": "sd15", "resolution": 256}, *[Path("/x")] * 4, class_images=4)
    assert _value(args, "--resolution") == "256"


def test_steady_state_drops_warmup_like_bench():
    durations = [5.0, 3.0, 1.0, 1.1, 0.9, 1.2, 1.0, 1.05]  # steps 1..8; the first holds the set-up
    ends = [sum(durations[: i + 1]) for i in range(len(durations))]
    for warmup in (0, 1, 2, 3):
        steady = steady_step_seconds(ends, warmup)
        assert steady == pytest.approx(durations[max(warmup, 1) :])  # step 1's duration is never known
        if warmup:
            assert len(steady) == len(durations) - warmup  # as many steps as bench's median uses
    assert statistics.median(steady_step_seconds(ends, 2)) == pytest.approx(1.025)
    assert steady_step_seconds(ends[:2], 2) == []


def test_written_model_loads_as_train_dreambooth_loads_it(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, PretrainedConfig

    from dreambooth.bench_reference import write_bench_model

    folder = write_bench_model("bench-tiny", tmp_path / "model")
    assert (folder / "model_index.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer", use_fast=False)
    ids = tokenizer(bench.INSTANCE_PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    assert len(ids) == 77 and ids[0] == 49406
    config = PretrainedConfig.from_pretrained(str(folder), subfolder="text_encoder")
    assert config.architectures == ["CLIPTextModel"]
    text_encoder = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder")
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    AutoencoderKL.from_pretrained(str(folder), subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    assert text_encoder.config.hidden_size == unet.config.cross_attention_dim == bench.BENCH_MODELS["bench-tiny"][2]
    assert scheduler.config.prediction_type == "epsilon"


FAKE_SCRIPT = """
import json, os, sys
import torch

args = sys.argv[1:]
steps = int(args[args.index("--max_train_steps") + 1])
out = args[args.index("--output_dir") + 1]
os.makedirs(out)
with open(os.path.join(os.environ["FAKE_LOG"]), "w") as handle:
    json.dump({"argv": sys.argv, "name": __name__, "offline": os.environ.get("HF_HUB_OFFLINE")}, handle)
weight = torch.nn.Parameter(torch.ones(3))
optimizer = torch.optim.AdamW([weight], lr=0.1)
for _ in range(steps):
    (weight ** 2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
"""


def test_measure_reference_times_every_optimizer_step(tmp_path, monkeypatch):
    script = tmp_path / "train_dreambooth.py"
    script.write_text(textwrap.dedent(FAKE_SCRIPT))
    work = tmp_path / "work"
    (work / "model-bench-tiny").mkdir(parents=True)  # present: the fake script needs no model
    log = tmp_path / "log.json"
    monkeypatch.setenv("FAKE_LOG", str(log))
    row = measure_reference(script, _config(prior=True, steps=6, warmup=2), work)
    assert row["mode"] == MODE and row["scale"] == "tiny64" and row["prior"] and not row["train_text"]
    assert 0 < row["seconds_per_step"] < 5
    assert 0 < row["peak_memory_gib"] <= row["peak_memory_gib_exit"]
    seen = json.loads(log.read_text())
    assert seen["name"] == "__main__" and seen["offline"] == "1"
    assert seen["argv"][0] == str(script)
    assert seen["argv"][seen["argv"].index("--num_class_images") + 1] == "4"  # the class images bench draws
    assert len(list((work / "data-64" / "class").iterdir())) == 4
    assert [p.name for p in work.iterdir() if p.name.startswith("run-")] == []  # output removed


def test_measure_reference_checks_the_step_count(tmp_path, monkeypatch):
    script = tmp_path / "train_dreambooth.py"
    script.write_text(textwrap.dedent(FAKE_SCRIPT).replace("range(steps)", "range(steps - 1)"))
    (tmp_path / "work" / "model-bench-tiny").mkdir(parents=True)
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "log.json"))
    with pytest.raises(RuntimeError, match="5 optimizer steps, not 6"):
        measure_reference(script, _config(steps=6), tmp_path / "work")


def test_table_shows_the_script_ratio(capsys):
    rows = [
        {"scale": "tiny64", "prior": False, "train_text": False, "mode": m, "seconds_per_step": s, "peak_memory_gib": 1}
        for m, s in (("default", 0.2), (MODE, 0.5))
    ]
    bench.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert any("vs script" in line for line in lines)
    default = next(line for line in lines if " default " in line)
    assert default.rstrip().endswith("2.50x")


def test_cli_accepts_reference():
    from dreambooth.cli import build_parser

    args = build_parser().parse_args(["bench", "--reference", "/ref/train_dreambooth.py", "--scales", "tiny128"])
    assert args.reference == "/ref/train_dreambooth.py"
    assert build_parser().parse_args(["bench"]).reference is None
