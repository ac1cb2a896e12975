"""The tiny-SDXL bench scale and its rows beside diffusers' train_dreambooth_lora_sdxl.py (v0.40.0), without the
script itself: the model folder the script reads, its command line, the method and family checks, the parsing of a
run, and our rows' adapted layers (the last once the trainer trains an SDXL LoRA)."""

from __future__ import annotations

import json
import tempfile
import textwrap
from pathlib import Path

import pytest

from dreambooth import bench, bench_lora
from dreambooth.bench_reference import MODE, check_script_method, measure_reference, script_arguments

SCALE = "tiny-sdxl128"


def _config(**changes):
    return {
        "scale": SCALE,
        "prior": False,
        "train_text": False,
        "batch": 1,
        "steps": 8,
        "warmup": 2,
        "method": "lora",
        "rank": 4,
        "targets": "diffusers",
        "learning_rate": 1e-4,
        **changes,
    }


def _arguments(**changes):
    return script_arguments(_config(**changes), *[Path(p) for p in ("/m", "/i", "/c", "/o")], class_images=4)


def _value(args, flag):
    return args[args.index(flag) + 1]


def _sdxl_components():
    from dreambooth.models.tiny import tiny_components

    return tiny_components(bench.bench_architecture(bench.SCALES[SCALE][0]), seed=0)


def _script_parameters(components, rank, train_text=False):
    """What train_dreambooth_lora_sdxl.py's LoraConfig adapts (its target names, matched by peft as suffixes): rank x
    (in + out) per Linear of the UNet and, with --train_text_encoder, of both text encoders."""
    import torch

    def count(model, names):
        return sum(
            rank * (module.in_features + module.out_features)
            for path, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and any(path.endswith("." + name) for name in names)
        )

    total = count(components.unet, bench_lora.DIFFUSERS_UNET_LAYERS)
    if train_text:
        for encoder in (components.text_encoder, components.text_encoder_2):
            total += count(encoder, bench_lora.DIFFUSERS_TEXT_LAYERS)
    return total


def test_the_tiny_sdxl_scale_is_the_tiny_sdxl_at_128_px():
    model, resolution = bench.SCALES[SCALE]
    arch = bench.bench_architecture(model)
    assert arch.is_sdxl and resolution == 128
    assert arch.unet["addition_embed_type"] == "text_time"
    assert arch.unet["cross_attention_dim"] == arch.text["hidden_size"] + arch.text_2["hidden_size"]
    assert SCALE not in bench.DEFAULT_SCALES  # its reference is another script: asked for by name


def test_the_sdxl_script_gets_what_the_sd_lora_script_gets_but_the_option_it_lacks():
    args = _arguments(rank=16, learning_rate=3e-4)
    assert _value(args, "--rank") == "16" and float(_value(args, "--learning_rate")) == 3e-4
    assert _value(args, "--resolution") == "128" and "--center_crop" in args
    assert _value(args, "--mixed_precision") == "no" and _value(args, "--train_batch_size") == "1"
    # train_dreambooth_lora_sdxl.py has no --pre_compute_text_embeddings: it encodes the prompts once by itself
    assert "--pre_compute_text_embeddings" not in args and "--train_text_encoder" not in args
    assert "--text_encoder_lr" not in args
    trained = _arguments(train_text=True, prior=True, learning_rate=3e-4)
    # its text encoders' rate is its own option (default 5e-6): the bench's one rate on both sides
    assert float(_value(trained, "--text_encoder_lr")) == 3e-4 and "--train_text_encoder" in trained
    assert "--with_prior_preservation" in trained and _value(trained, "--num_class_images") == "4"
    sd = script_arguments({**_config(), "scale": "tiny64"}, *[Path("/x")] * 4, class_images=4)
    assert "--pre_compute_text_embeddings" in sd  # the SD LoRA script's rows are as before


def test_the_script_must_match_the_family_and_the_method(tmp_path):
    sdxl_lora = tmp_path / "train_dreambooth_lora_sdxl.py"
    sdxl_lora.write_text("from peft import LoraConfig\nfrom diffusers import StableDiffusionXLPipeline\n")
    sd_lora = tmp_path / "train_dreambooth_lora.py"
    sd_lora.write_text("from peft import LoraConfig\nfrom diffusers import StableDiffusionPipeline\n")
    check_script_method(sdxl_lora, "lora", sdxl=True)
    check_script_method(sd_lora, "lora", sdxl=False)
    with pytest.raises(ValueError, match=r"trains an SD 1\.x / 2\.x model.*train_dreambooth_lora_sdxl\.py"):
        check_script_method(sd_lora, "lora", sdxl=True)
    with pytest.raises(ValueError, match="trains an SDXL model"):
        check_script_method(sdxl_lora, "lora", sdxl=False)
    with pytest.raises(ValueError, match="SDXL DreamBooth only as a LoRA script"):
        check_script_method(sdxl_lora, "full", sdxl=True)
    work = tmp_path / "work"
    with pytest.raises(ValueError, match=r"train_dreambooth_lora_sdxl\.py"):  # before anything is written or run
        measure_reference(sd_lora, _config(), work)
    assert not work.exists()


def test_the_written_model_loads_as_the_sdxl_script_loads_it(tmp_path):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection, PretrainedConfig

    from dreambooth.bench_reference import write_bench_model

    folder = write_bench_model(bench.BENCH_TINY_SDXL, tmp_path / "model")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["scheduler"][1] == "DDPMScheduler"  # the script's determine_scheduler_type reads this entry
    for subfolder in ("tokenizer", "tokenizer_2"):
        tokenizer = AutoTokenizer.from_pretrained(str(folder), subfolder=subfolder, use_fast=False)
        ids = tokenizer(bench.INSTANCE_PROMPT, padding="max_length", max_length=tokenizer.model_max_length).input_ids
        assert len(ids) == 77 and ids[0] == 49406
    # the script picks each encoder's class by its config's architectures
    assert PretrainedConfig.from_pretrained(str(folder), subfolder="text_encoder").architectures == ["CLIPTextModel"]
    config_2 = PretrainedConfig.from_pretrained(str(folder), subfolder="text_encoder_2")
    assert config_2.architectures == ["CLIPTextModelWithProjection"]
    one = CLIPTextModel.from_pretrained(str(folder), subfolder="text_encoder")
    two = CLIPTextModelWithProjection.from_pretrained(str(folder), subfolder="text_encoder_2")
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet")
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae")
    DDPMScheduler.from_pretrained(str(folder), subfolder="scheduler")
    assert unet.config.cross_attention_dim == one.config.hidden_size + two.config.hidden_size
    time_ids = unet.config.projection_class_embeddings_input_dim - two.config.projection_dim
    assert time_ids == 6 * unet.config.addition_time_embed_dim  # the script's six time ids per sample
    assert vae.config.scaling_factor == pytest.approx(0.13025)


FAKE_SDXL_SCRIPT = """
# stands in for train_dreambooth_lora_sdxl.py: LoraConfig, StableDiffusionXLPipeline
import json, os, sys
import torch

args = sys.argv[1:]
steps = int(args[args.index("--max_train_steps") + 1])
os.makedirs(args[args.index("--output_dir") + 1])
with open(os.environ["FAKE_LOG"], "w") as handle:
    json.dump({"argv": sys.argv, "offline": os.environ.get("HF_HUB_OFFLINE")}, handle)
weight = torch.nn.Parameter(torch.ones(5, 3))
optimizer = torch.optim.AdamW([weight], lr=0.1)
for _ in range(steps):
    (weight ** 2).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
"""


def test_a_reference_run_on_the_sdxl_scale_is_parsed_into_a_row(tmp_path, monkeypatch):
    script = tmp_path / "train_dreambooth_lora_sdxl.py"
    script.write_text(textwrap.dedent(FAKE_SDXL_SCRIPT))
    work = tmp_path / "work"
    (work / f"model-{bench.BENCH_TINY_SDXL}").mkdir(parents=True)  # present: the stand-in needs no model
    log = tmp_path / "log.json"
    monkeypatch.setenv("FAKE_LOG", str(log))
    row = measure_reference(script, _config(prior=True, steps=6, warmup=2, rank=16), work)
    assert row["mode"] == MODE and row["scale"] == SCALE and row["method"] == "lora"
    assert row["rank"] == 16 and row["targets"] == "diffusers"
    assert row["trained_parameters"] == 15  # what its optimizer steps, counted at the first step
    assert 0 < row["seconds_per_step"] < 5 and 0 < row["peak_memory_gib"] <= row["peak_memory_gib_exit"]
    argv = json.loads(log.read_text())["argv"]
    assert argv[argv.index("--resolution") + 1] == "128" and "--pre_compute_text_embeddings" not in argv
    assert len(list((work / "data-128" / "class").iterdir())) == 4  # the class images bench draws, 128 px


def test_the_bench_offers_the_sdxl_scales_and_refuses_a_floor_there():
    from dreambooth.cli import build_parser

    args = build_parser().parse_args(
        ["bench", "--training-method", "lora", "--network-targets", "diffusers", "--scales", SCALE, "tiny-sdxl256"]
    )
    assert args.scales == [SCALE, "tiny-sdxl256"] and bench.SCALES["tiny-sdxl256"][1] == 256
    with pytest.raises(ValueError, match="floor does not exist for the SDXL scale"):
        bench.measure_one({**_config(), "method": "full", "mode": "floor"})


def test_the_sdxl_scripts_layers_counted_from_its_target_names():
    """The real script, run on this folder at rank 4 (/work/ref, .venv-ref, 2026-11-30), stepped 73,984 parameters:
    what its target names give on the tiny SDXL's UNet (the text encoders frozen)."""
    assert _script_parameters(_sdxl_components(), 4) == 73984


@pytest.mark.parametrize("train_text", [False, True], ids=["text-frozen", "text-trained"])
def test_diffusers_targets_adapt_exactly_the_sdxl_scripts_layers(train_text):
    from dreambooth.network import adapter
    from dreambooth.settings import Settings

    components = _sdxl_components()
    spec = _config(train_text=train_text)
    settings = Settings(**bench_lora.lora_settings(spec))
    with bench_lora.lora_targets(spec):
        network = adapter.build_network(components, settings)
    if train_text and not any(t.component == "text_encoder_2" for t in network.targets.values()):
        pytest.skip("the adapter does not adapt SDXL's second text encoder yet (branch sdxl-lora)")
    ours = sum(p.numel() for group in network.param_groups(1e-4, 1e-4) for p in group["params"])
    assert ours == _script_parameters(components, 4, train_text)
    assert all(bench_lora.is_diffusers_target(target) for target in network.targets.values())


@pytest.mark.slow  # two short trainer runs (tiny SDXL, 128 px, 2 steps each) with their tracked passes
def test_our_sdxl_lora_rows_train_the_scripts_parameters_and_report_their_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    expected = _script_parameters(_sdxl_components(), 4)
    for mode in bench_lora.LORA_MODES:
        row = bench.measure_one(_config(mode=mode, steps=2, warmup=0))
        assert row["method"] == "lora" and row["targets"] == "diffusers"
        assert row["trained_parameters"] == expected  # the optimizer steps the adapters, as the script's does
        assert row["seconds_per_step"] > 0
        assert row["estimate_mib"] == pytest.approx(row["tracked_mib"], rel=0.03)
