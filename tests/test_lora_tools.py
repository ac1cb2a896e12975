"""LoRA tools (issue 14, "Tools"): merge a LoRA / LoHa / LoKr into a checkpoint, extract a LoRA from a fine-tune.

The reference for "the merged checkpoint equals base + applied LoRA" is LyCORIS's own modules: each layer of the
file is rebuilt with ``make_module_from_state_dict`` and hooked into the base model with ``apply_to`` (its forward
adds the layer's delta to the layer's output, at the multiplier), which lora_facts.md §2 measured equal to the
WebUI's own Lora math.  In the latest environment diffusers' ``load_lora_weights`` + ``fuse_lora`` is a second,
independent reader of kohya LoRA files.
"""

from __future__ import annotations

import json

import pytest
import torch

from dreambooth.compat import quiet_bitsandbytes
from dreambooth.errors import DreamBoothError, ModelFileError
from dreambooth.models.components import load_components, save_single_file
from dreambooth.models.files import read_state_dict
from dreambooth.network.extract import extract_lora
from dreambooth.network.files import read_network_file, write_network_file
from dreambooth.network.merge import MERGED_KEY, NetworkMismatchError, layer_deltas, merge_lora
from dreambooth.network.names import all_layers, select_targets

with quiet_bitsandbytes():
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

# algorithm -> (LyCORIS class, its options): LoRA with k x k conv downs, LoRA with a Tucker lora_mid on the 3x3
# convolutions, LoHa, and LoKr (factor 4: small layers get full factors (scale 1), larger ones a decomposed w2)
ALGORITHMS = {
    "lora": (LoConModule, {}),
    "lora_mid": (LoConModule, {"use_tucker": True}),
    "loha": (LohaModule, {}),
    "lokr": (LokrModule, {"factor": 4}),
}
CLASSES = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}


@pytest.fixture(scope="module")
def sd1(tiny_checkpoint):
    return tiny_checkpoint("sd1-sd")


@pytest.fixture(scope="module")
def sd1_components(sd1):
    return load_components(sd1)


def network_tensors(components, algorithm="lora", rank=4, alpha=2.0, conv=True, text=True, seed=0, std=None):
    """A file's tensors made by LyCORIS's modules on kohya's layers, with random factors (LyCORIS starts one
    factor at zero; a trained file's are not).  LoHa multiplies four factors: larger ones give a visible delta."""
    cls, options = ALGORITHMS[algorithm]
    std = std or (0.3 if algorithm == "loha" else 0.05)
    targets = select_targets(components.unet, components.text_encoder if text else None, conv=conv)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    with torch.no_grad():
        for target in targets:
            module = cls(target.name, target.module, 1.0, rank, alpha, **options)
            for key, value in module.state_dict().items():
                if key != "alpha":
                    value = torch.randn(value.shape, generator=generator) * std
                tensors[f"{target.name}.{key}"] = value
    return tensors


def write_network(components, path, algorithm="lora", metadata=None, **options):
    return write_network_file(path, network_tensors(components, algorithm, **options), metadata or {})


def apply_with_lycoris(components, path, weight):
    """Hook every layer of the file into ``components`` through LyCORIS's own module forward at ``weight``."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    layers = all_layers(components.unet, components.text_encoder)
    names = {key.split(".", 1)[0] for key in tensors}
    with torch.no_grad():
        for name in sorted(names):
            cls = next(c for c in CLASSES.values() if c.algo_check(tensors, name))
            module = cls.make_module_from_state_dict(name, layers[name].module, *cls.extract_state_dict(tensors, name))
            module.multiplier = weight
            module.apply_to()
    return len(names)


def outputs(components):
    """UNet noise prediction and text-encoder hidden states for fixed inputs shaped like the real ones."""
    generator = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, components.arch.unet["cross_attention_dim"], generator=generator)
    ids = torch.randint(0, components.arch.text["vocab_size"], (1, 77), generator=generator)
    with torch.no_grad():
        unet = components.unet(latent, torch.tensor([500]), encoder_hidden_states=context).sample
        text = components.text_encoder(ids)[0]
    return unet, text


def assert_same_outputs(mine, reference, base, what):
    """``mine`` equals ``reference`` within fp32 rounding, and both differ clearly from ``base`` (not vacuous)."""
    for a, b, c, part in zip(mine, reference, base, ("UNet", "text encoder")):
        change = (b - c).abs().max().item()
        assert change > 1e-2, f"{what}: the LoRA hardly changes the {part} output ({change})"
        assert (a - b).abs().max().item() < 1e-4 * max(1.0, b.abs().max().item()), f"{what}: {part}"


def largest_difference(ours, theirs):
    """The largest absolute difference between the tensors of two state dicts, over the keys of ``ours``."""
    return max(float((value.float() - theirs[key].float()).abs().max()) for key, value in ours.items())


# ------------------------------------------------------------------------------------------------ merging


@pytest.mark.parametrize(
    ("variant", "algorithm", "weight"),
    [
        ("sd1-sd", "lora", 1.0),
        ("sd1-sd", "lora", 0.5),
        ("sd1-sd", "lora_mid", 0.5),
        ("sd1-sd", "loha", 0.5),
        ("sd1-sd", "lokr", 0.5),
        ("sd2-v-sd", "lora", 0.5),
    ],
)
def test_the_merged_checkpoint_equals_the_base_with_the_lora_applied(
    tiny_checkpoint, tmp_path, variant, algorithm, weight
):
    """Acceptance (issue 14): the merged checkpoint from merge-lora equals base + applied LoRA: its UNet and text
    encoder outputs equal those of the base with every layer of the file applied by LyCORIS's own forward at the
    same weight (LoRA with 3x3 conv layers, with a Tucker mid, LoHa, LoKr; weight 1 and 0.5; SD 1.x and 2.x)."""
    base = tiny_checkpoint(variant)
    reference = load_components(base)
    lora = write_network(reference, tmp_path / f"{algorithm}.safetensors", algorithm, alpha=2.0)
    out = tmp_path / "merged.safetensors"
    report = merge_lora(base, lora, out, weight=weight)

    base_outputs = outputs(reference)
    applied = apply_with_lycoris(reference, lora, weight)
    assert report.layers == applied and report.text_layers > 0
    assert_same_outputs(outputs(load_components(out)), outputs(reference), base_outputs, f"{algorithm} at {weight}")

    # every other tensor of the base is written as it was; only the merged layers' weights changed
    before, _ = read_state_dict(base)
    after, metadata = read_state_dict(out)
    assert set(after) == set(before)
    changed = [key for key in before if not torch.equal(before[key], after[key])]
    assert all(key.endswith((".weight", "in_proj_weight")) for key in changed)
    assert not any(key.startswith("first_stage_model.") for key in changed)
    if variant == "sd1-sd":
        assert len(changed) == report.layers  # one tensor per layer
    else:
        assert 0 < len(changed) < report.layers  # SD 2.x's q, k, v share one in_proj_weight
    record = json.loads(metadata[MERGED_KEY])
    assert record == [
        {"file": lora.name, "hash": read_network_file(lora).metadata["sshs_model_hash"], "weight": weight,
         "algorithm": "lora" if algorithm == "lora_mid" else algorithm, "layers": report.layers}
    ]  # fmt: skip


def test_layer_deltas_scale_by_alpha_over_rank_and_weight(sd1_components, tmp_path):
    """The delta is up @ down x alpha / rank x weight (the WebUI's rule); without alpha the scale is 1."""
    tensors = network_tensors(sd1_components, "lora", rank=4, alpha=2.0, conv=False, text=False)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    only = {k: v for k, v in tensors.items() if k.startswith(name + ".")}
    layers = all_layers(sd1_components.unet, sd1_components.text_encoder)
    product = only[f"{name}.lora_up.weight"] @ only[f"{name}.lora_down.weight"]
    with_alpha = layer_deltas(write_network_file(tmp_path / "a.safetensors", only, {}), layers, weight=0.25)
    torch.testing.assert_close(with_alpha[name], product * (2.0 / 4) * 0.25)
    del only[f"{name}.alpha"]
    without = layer_deltas(write_network_file(tmp_path / "b.safetensors", only, {}), layers, weight=1.0)
    torch.testing.assert_close(without[name], product)


def test_a_second_merge_is_recorded_after_the_first(sd1, sd1_components, tmp_path):
    first = write_network(sd1_components, tmp_path / "first.safetensors", "lora", seed=1)
    second = write_network(sd1_components, tmp_path / "second.safetensors", "loha", seed=2)
    merge_lora(sd1, first, tmp_path / "one.safetensors", weight=0.7)
    merge_lora(tmp_path / "one.safetensors", second, tmp_path / "two.safetensors", weight=1.0)
    _, metadata = read_state_dict(tmp_path / "two.safetensors")
    assert [(r["file"], r["weight"]) for r in json.loads(metadata[MERGED_KEY])] == [
        ("first.safetensors", 0.7),
        ("second.safetensors", 1.0),
    ]


def test_merge_with_half_writes_fp16(sd1, sd1_components, tmp_path):
    lora = write_network(sd1_components, tmp_path / "l.safetensors", "lora")
    merge_lora(sd1, lora, tmp_path / "half.safetensors", weight=1.0, half=True)
    merge_lora(sd1, lora, tmp_path / "full.safetensors", weight=1.0)
    half, _ = read_state_dict(tmp_path / "half.safetensors")
    full, _ = read_state_dict(tmp_path / "full.safetensors")
    for key, tensor in full.items():
        if tensor.is_floating_point():
            assert half[key].dtype == torch.float16 and torch.equal(half[key], tensor.half()), key


def test_diffusers_fuse_lora_gives_the_same_weights_as_our_merge(sd1, sd1_components, tmp_path):
    """Acceptance (issue 14), an independent reader: diffusers' ``load_lora_weights`` (it reads kohya files) and
    ``fuse_lora(lora_scale=w)`` on a pipeline built from the base's components give the UNet and text-encoder
    weights of our merged checkpoint (LoRA with 3x3 convolutions, alpha != rank, weight 0.5)."""
    import diffusers.utils

    if not diffusers.utils.USE_PEFT_BACKEND:
        import transformers
        from packaging.version import Version

        if Version(transformers.__version__) < Version("4.34"):
            pytest.skip(
                "diffusers' load_lora_weights needs its PEFT backend (transformers >= 4.34): the WebUI's "
                "environment (diffusers 0.31, transformers 4.30) has no LoRA loading"
            )
        pytest.skip("diffusers' load_lora_weights needs peft, which this environment lacks")
    with quiet_bitsandbytes():
        from diffusers import StableDiffusionPipeline

    lora = write_network(sd1_components, tmp_path / "kohya.safetensors", "lora", alpha=2.0)
    out = tmp_path / "merged.safetensors"
    merge_lora(sd1, lora, out, weight=0.5)
    merged = load_components(out)

    base = load_components(sd1)
    pipe = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=base.noise_scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipe.load_lora_weights(str(lora))
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=0.5)
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    for theirs, ours, before in (
        (pipe.unet, merged.unet, sd1_components.unet),
        (pipe.text_encoder, merged.text_encoder, sd1_components.text_encoder),
    ):
        expected = {k.replace(".base_layer", ""): v for k, v in theirs.state_dict().items()}
        original = before.state_dict()
        mine = ours.state_dict()
        assert set(mine) <= set(expected)
        assert largest_difference(mine, expected) < 2e-6
        assert largest_difference(mine, original) > 1e-3  # the LoRA was merged (not a comparison of two bases)


# ------------------------------------------------------------------------------------------------ extracting


def add_known_deltas(components, rank, seed=0, text=True):
    """Add a random rank-``rank`` delta to every layer kohya's LoCon adapts (3x3 convs included); returns them."""
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for target in select_targets(components.unet, components.text_encoder if text else None, conv=True):
        weight = target.module.weight
        out_features, inputs = weight.shape[0], weight[0].numel()
        r = min(rank, out_features, inputs)
        up = torch.randn(out_features, r, generator=generator) * 0.1
        down = torch.randn(r, inputs, generator=generator) * 0.1
        deltas[target.name] = (up @ down).reshape(weight.shape)
        weight.data += deltas[target.name]
    return deltas


@pytest.fixture(scope="module")
def tuned(sd1, tmp_path_factory):
    """The base with a known rank-4 delta in every LoCon layer, text encoder included, as a checkpoint."""
    components = load_components(sd1)
    deltas = add_known_deltas(components, rank=4)
    path = tmp_path_factory.mktemp("tuned") / "tuned.safetensors"
    save_single_file(components, path)
    return path, deltas


@pytest.mark.slow
def test_extract_recovers_a_known_rank_r_difference(sd1, sd1_components, tuned, tmp_path):
    """extract-lora at the rank of the difference recovers it: every layer's delta (as the WebUI applies the file)
    equals the known one and the report's relative error is ~0; the base with the extracted LoRA merged gives the
    fine-tune's outputs.  At a lower rank the error is reported, matches the file's real error, and is > 0."""
    path, deltas = tuned
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(path, sd1, out, rank=4, conv_rank=4)
    assert report.relative_error < 1e-5 and report.text_encoder and report.layers == len(deltas)
    network = read_network_file(out)
    assert network.algorithm == "lora" and {float(network.alpha(n)) for n in network.layers} == {4.0}
    metadata = network.metadata
    assert metadata["ss_network_dim"] == "4" and metadata["ss_v2"] == "False"
    assert metadata["ss_base_model_version"] == "sd_v1" and json.loads(metadata["ss_network_args"])["conv_dim"] == "4"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert network.tensors[f"{conv}.lora_down.weight"].shape[2:] == (3, 3)  # kohya: down k x k, up 1 x 1
    assert network.tensors[f"{conv}.lora_up.weight"].shape[2:] == (1, 1)
    layers = all_layers(sd1_components.unet, sd1_components.text_encoder)
    recovered = layer_deltas(network, layers)
    assert set(recovered) == set(deltas) and largest_difference(deltas, recovered) < 1e-5
    merged = tmp_path / "merged.safetensors"
    merge_lora(sd1, out, merged)
    assert_same_outputs(outputs(load_components(merged)), outputs(load_components(path)), outputs(sd1_components),
                        "extracted")  # fmt: skip

    low = extract_lora(path, sd1, tmp_path / "low.safetensors", rank=2, conv_rank=2)
    assert 0.3 < low.relative_error < 0.95 and low.worst_error >= low.relative_error
    recovered = layer_deltas(read_network_file(tmp_path / "low.safetensors"), layers)
    error = sum(float((recovered[n] - d).pow(2).sum()) for n, d in deltas.items())
    norm = sum(float(d.pow(2).sum()) for d in deltas.values())
    assert low.relative_error == pytest.approx((error / norm) ** 0.5, rel=1e-3)
    assert "relative error" in low.summary() and f"{low.relative_error:.2%}" in low.summary()


def test_extract_leaves_out_an_unchanged_text_encoder_and_conv_layers_without_conv_rank(sd1, tmp_path):
    components = load_components(sd1)
    add_known_deltas(components, rank=2, text=False)
    path = tmp_path / "unet-only.safetensors"
    save_single_file(components, path)
    report = extract_lora(path, sd1, tmp_path / "x.safetensors", rank=2)
    network = read_network_file(tmp_path / "x.safetensors")
    assert not report.text_encoder and not any(n.startswith("lora_te") for n in network.layers)
    assert not any("resnets" in n or "samplers" in n for n in network.layers)
    assert report.relative_error < 1e-5  # the attention layers' rank-2 deltas, at rank 2
    assert 0.3 < report.left_out < 1 and "--conv-rank" in report.summary()  # the resnets' deltas are not in it


@pytest.mark.slow
def test_merge_then_extract_round_trip(sd1, sd1_components, tmp_path):
    """merge-lora a rank-4 LoRA, extract-lora from (merged, base) at rank 4: the same per-layer deltas, and merging
    the extracted file gives the same checkpoint as merging the original."""
    lora = write_network(sd1_components, tmp_path / "orig.safetensors", "lora", rank=4, alpha=2.0)
    merge_lora(sd1, lora, tmp_path / "merged.safetensors")
    report = extract_lora(tmp_path / "merged.safetensors", sd1, tmp_path / "back.safetensors", rank=4, conv_rank=4)
    assert report.relative_error < 1e-5
    layers = all_layers(sd1_components.unet, sd1_components.text_encoder)
    original = layer_deltas(read_network_file(lora), layers)
    extracted = layer_deltas(read_network_file(tmp_path / "back.safetensors"), layers)
    assert set(extracted) == set(original) and largest_difference(original, extracted) < 1e-5
    merge_lora(sd1, tmp_path / "back.safetensors", tmp_path / "again.safetensors")
    first, _ = read_state_dict(tmp_path / "merged.safetensors")
    again, _ = read_state_dict(tmp_path / "again.safetensors")
    assert set(again) == set(first) and largest_difference(first, again) < 1e-5


# ------------------------------------------------------------------------------------------------ bad input


def no_new_files(folder, before):
    return sorted(p.name for p in folder.iterdir()) == before


def test_a_lora_for_another_model_is_refused_with_one_sentence_and_nothing_written(sd1, tiny_checkpoint, tmp_path):
    """An SD 2.x LoRA on an SD 1.x model: refused by its metadata (ss_v2), and without metadata by its layers'
    shapes (SD 2.x's proj_in is a Linear, SD 1.x's a 1x1 convolution; an SD 1.x LoKr on SD 2.x too); an SDXL LoRA
    by its layer names; a layer of another size.  Each: one sentence naming the LoRA file and the layer, no
    output, no temporary file."""
    sd2 = load_components(tiny_checkpoint("sd2-v-sd"))
    labelled = write_network(sd2, tmp_path / "sd2.safetensors", metadata={"ss_v2": "True"})
    bare = write_network(sd2, tmp_path / "sd2-bare.safetensors", text=False)
    xl_name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    xl = write_network_file(
        tmp_path / "xl.safetensors",
        {f"{xl_name}.lora_down.weight": torch.zeros(4, 640), f"{xl_name}.lora_up.weight": torch.zeros(640, 4)},
        {},
    )
    sd1_components = load_components(sd1)
    wrong = network_tensors(sd1_components, conv=False, text=False)
    key = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"
    wrong[key] = torch.zeros(4, 48)  # the context width of another model
    wrong = write_network_file(tmp_path / "wrong.safetensors", wrong, {})
    out = tmp_path / "out.safetensors"
    before = sorted(p.name for p in tmp_path.iterdir())
    cases = [
        (labelled, ["trained on SD 2.x", "SD 1.x"]),
        (bare, ["proj_in", "SD 2.x LoRA on an SD 1.x model"]),
        (xl, [xl_name, "is not a layer of", "SDXL"]),
        (wrong, ["attn2_to_k has the shape 64x48 in the file but 64x32 in tiny-sd1-sd.safetensors"]),
    ]
    for lora, words in cases:
        with pytest.raises(NetworkMismatchError) as caught:
            merge_lora(sd1, lora, out)
        message = str(caught.value)
        assert message.startswith(f"{lora}: ") and "\n" not in message, message
        for word in words:
            assert word in message, (word, message)
        assert no_new_files(tmp_path, before)
    # and the other way round: an SD 1.x LoKr (its 1x1 proj_in stays 4-D) on an SD 2.x model (a Linear proj_in)
    lokr = write_network(sd1_components, tmp_path / "sd1-lokr.safetensors", "lokr", text=False)
    with pytest.raises(NetworkMismatchError, match=r"proj_in has the shape 32x32x1x1 in the file but 32x32 in"):
        merge_lora(tiny_checkpoint("sd2-v-sd"), lokr, out)
    assert not out.exists()


def test_missing_files_and_an_existing_output_are_refused(sd1, sd1_components, tmp_path):
    lora = write_network(sd1_components, tmp_path / "l.safetensors", conv=False, text=False)
    out = tmp_path / "exists.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(DreamBoothError, match="already exists"):
        merge_lora(sd1, lora, out)
    with pytest.raises(DreamBoothError, match="already exists"):
        extract_lora(sd1, sd1, out, rank=4)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(ModelFileError, match=r"missing\.safetensors: no such file"):
        merge_lora(sd1, tmp_path / "missing.safetensors", tmp_path / "new.safetensors")
    with pytest.raises(ModelFileError, match=r"nobase\.safetensors: no such file"):
        merge_lora(tmp_path / "nobase.safetensors", lora, tmp_path / "new.safetensors")
    with pytest.raises(ModelFileError, match="no such file"):
        extract_lora(tmp_path / "nothing.safetensors", sd1, tmp_path / "new.safetensors", rank=4)
    with pytest.raises(DreamBoothError, match="same weights"):
        extract_lora(sd1, sd1, tmp_path / "new.safetensors", rank=4)
    assert not (tmp_path / "new.safetensors").exists()
    merge_lora(sd1, lora, out, overwrite=True)  # asked for: replaced
    assert read_state_dict(out)[1][MERGED_KEY]


def test_extract_refuses_models_of_two_families(sd1, tiny_checkpoint, tmp_path):
    with pytest.raises(ModelFileError, match="the model it was trained from"):
        extract_lora(tiny_checkpoint("sd2-v-sd"), sd1, tmp_path / "x.safetensors", rank=4)


# ------------------------------------------------------------------------------------------------ command line


def test_cli_merge_lora_and_extract_lora_end_to_end(sd1, sd1_components, tuned, tmp_path, capsys):
    """``python -m dreambooth merge-lora BASE LORA OUT --weight W`` and ``extract-lora TUNED BASE OUT --rank R``:
    the files are written, an existing output is refused unless --overwrite, bad input is one line, exit 2."""
    from dreambooth.cli import main

    lora = write_network(sd1_components, tmp_path / "style.safetensors", "lokr")
    out = tmp_path / "merged.safetensors"
    assert main(["merge-lora", str(sd1), str(lora), str(out), "--weight", "0.5", "--half"]) == 0
    printed = capsys.readouterr().out
    assert "merged" in printed and "lokr" in printed and str(out) in printed
    assert json.loads(read_state_dict(out)[1][MERGED_KEY])[0]["weight"] == 0.5
    assert main(["merge-lora", str(sd1), str(lora), str(out)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exists" in error and "--overwrite" in error
    assert main(["merge-lora", str(sd1), str(lora), str(out), "--overwrite"]) == 0
    assert main(["merge-lora", str(sd1), str(tmp_path / "none.safetensors"), str(tmp_path / "o.safetensors")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "none.safetensors: no such file" in error and "Traceback" not in error

    path, _ = tuned
    extracted = tmp_path / "extracted.safetensors"
    assert main(["extract-lora", str(path), str(sd1), str(extracted), "--rank", "2", "--conv-rank", "2"]) == 0
    printed = capsys.readouterr().out
    assert "relative error of the low-rank approximation" in printed and read_network_file(extracted).layers
    assert main(["extract-lora", str(path), str(sd1), str(extracted), "--rank", "2"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as caught:  # argparse: usage and one line, exit 2
        main(["extract-lora", str(path), str(sd1), str(tmp_path / "y.safetensors"), "--rank", "0"])
    assert caught.value.code == 2 and "whole number of 1 or more" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the tab


@pytest.fixture
def model_tools(sd1, tuned, tmp_path):
    """The tab's LoRA tools on a host that may read the tiny models and tmp_path/home, and write its own folders
    (checkpoint folder, Lora folder, data folder)."""
    from dreambooth.host import Host
    from dreambooth.ui.model_tools import ModelTools

    (tmp_path / "home").mkdir()
    models = tmp_path / "models"
    host = Host(models, allowed_roots=[sd1.parent, tuned[0].parent, tmp_path / "home"], write_roots=[models / "Lora"])
    return ModelTools(host)


@pytest.mark.gradio
@pytest.mark.slow
def test_the_tab_merges_and_extracts_inside_the_path_policy(model_tools, sd1, sd1_components, tuned, tmp_path):
    """The Dataset tools panel's "LoRA: merge" and "LoRA: extract": a bare name lands in the checkpoint folder /
    the Lora folder; a file outside the read roots, an output outside the write roots and an existing output are
    refused with the policy's sentence before anything is read or written."""
    tools, home = model_tools, tmp_path / "home"
    lora = write_network(sd1_components, home / "style.safetensors", "loha")
    report = tools.merge(str(sd1), str(lora), 0.5, "styled", False, False)
    merged = tools.host.checkpoint_dir / "styled.safetensors"
    assert "merged" in report and merged.is_file(), report
    assert json.loads(read_state_dict(merged)[1][MERGED_KEY])[0]["weight"] == 0.5
    assert "already exists" in tools.merge(str(sd1), str(lora), 1, "styled", False, False)
    assert "Not merged" not in tools.merge("styled.safetensors", str(lora), 1, "again", True, False)  # a title

    outside = tmp_path / "outside"
    outside.mkdir()
    stray = write_network(sd1_components, outside / "stray.safetensors", "lora")
    report = tools.merge(str(sd1), str(stray), 1, "x", False, False)
    assert report.startswith("**Not merged:** LoRA file:") and "outside the folders this server may read" in report
    report = tools.merge(str(sd1), str(lora), 1, str(home / "x.safetensors"), False, False)
    assert "may write to" in report and not (home / "x.safetensors").exists()
    assert "give a file name" in tools.merge(str(sd1), str(lora), 1, "", False, False)

    report = tools.extract(str(tuned[0]), str(sd1), "extracted", 4, 4, False)
    assert "relative error" in report and (tools.lora_dir / "extracted.safetensors").is_file(), report
    assert "Not merged" not in tools.merge(str(sd1), "extracted.safetensors", 1, "back", False, False)  # a title
    assert "already exists" in tools.extract(str(tuned[0]), str(sd1), "extracted", 4, 0, False)
    report = tools.extract(str(outside / "t.safetensors"), str(sd1), "e2", 4, 0, False)
    assert "Not extracted" in report and "outside the folders" in report
    assert "whole number" in tools.extract(str(tuned[0]), str(sd1), "e3", 0, 0, False)


@pytest.mark.gradio
def test_the_lora_tools_are_in_the_dataset_tools_panel(tmp_path):
    from dreambooth.host import Host
    from dreambooth.runner import Runner
    from dreambooth.ui.tab import build_tab

    host = Host(tmp_path / "models", allowed_roots=[tmp_path])
    blocks, _ = build_tab(host, Runner(host))
    ids = {getattr(block, "elem_id", None) for block in blocks.blocks.values()}
    assert {"db_tool_merge_lora", "db_tool_merge_run", "db_tool_extract_lora", "db_tool_extract_run"} <= ids
    wired = {blocks.blocks[i].elem_id for d in blocks.dependencies for i in d["targets"] if i in blocks.blocks}
    assert {"db_tool_merge_run", "db_tool_extract_run"} <= wired


def test_a_text_encoder_named_lora_te1_is_merged_into_the_text_encoder(sd1_components, tmp_path):
    """diffusers' ``convert_state_dict_to_kohya`` names SD 1.x's text encoder ``lora_te1_`` (SDXL's first); the
    WebUI maps it to the text encoder, and so does the merge."""
    tensors = network_tensors(sd1_components, "lora", conv=False)
    renamed = {k.replace("lora_te_", "lora_te1_", 1): v for k, v in tensors.items()}
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_") for k in renamed)
    layers = all_layers(sd1_components.unet, sd1_components.text_encoder)
    plain = layer_deltas(write_network_file(tmp_path / "te.safetensors", tensors, {}), layers)
    aliased = layer_deltas(write_network_file(tmp_path / "te1.safetensors", renamed, {}), layers)
    assert set(aliased) == set(plain) and largest_difference(plain, aliased) == 0
