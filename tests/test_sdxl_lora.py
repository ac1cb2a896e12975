"""SDXL LoRA / LoHa / LoKr (issue 15, Methods): the names kohya's SDXL trainer writes and the WebUI matches
(``lora_unet_<sgm path>``, ``lora_te1_``, ``lora_te2_``), checked by independent readers: the WebUI's own math and
name rules, diffusers' ``StableDiffusionXLPipeline.load_lora_weights``; merge-lora and extract-lora on SDXL.

Tiny SDXL models (``models/tiny.py::tiny_sdxl_architecture``: SDXL's block layout at 32/64 channels) and the
full-size SDXL layout on the meta device (no memory, no download).
"""

from __future__ import annotations

import re
import types

import pytest
import torch
from test_lora import layer_input, randomize, run_layer, webui_delta

from dreambooth.models.components import load_components, save_single_file
from dreambooth.models.tiny import tiny_architecture, tiny_components
from dreambooth.network.adapter import build_network
from dreambooth.network.files import read_network_file, write_network_file
from dreambooth.network.names import all_layers, select_targets

UNET = "model.diffusion_model."


def sdxl_components(seed=0):
    return tiny_components(tiny_architecture("sdxl"), seed=seed)


def adapter_settings(algorithm="lora", rank=4, alpha=2.0, conv_rank=0, conv_alpha=0.0, text=True):
    return types.SimpleNamespace(
        training_method=algorithm,
        network_rank=rank,
        network_alpha=alpha,
        network_conv_rank=conv_rank,
        network_conv_alpha=conv_alpha,
        network_train_text_encoder=text,
        network_dropout=0.0,
        seed=7,
    )


# ------------------------------------------------------------------------------------------------------ names


def test_sdxl_names_are_kohyas_sgm_paths_and_te1_te2_and_name_the_checkpoints_layers(tiny_checkpoint):
    """The UNet's layers by their sgm path (the path of the layer's weight in the SDXL checkpoint, with the same
    shape), CLIP ViT-L as lora_te1_, OpenCLIP ViT-bigG as lora_te2_ (q, k, v and out_proj of every layer: the WebUI
    applies them through OpenCLIP's fused in_proj only all four together); no diffusers-style name."""
    from dreambooth.models.files import read_state_dict

    c = sdxl_components()
    targets = select_targets(c.unet, c.text_encoder, conv=True, text_encoder_2=c.text_encoder_2)
    names = {t.name: t for t in targets}
    assert len(names) == len(targets)
    for name in (
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",  # down_blocks.1.attentions.0
        "lora_unet_input_blocks_8_1_transformer_blocks_1_ff_net_0_proj",  # the deepest level: 2 transformer blocks
        "lora_unet_middle_block_1_proj_in",
        "lora_unet_output_blocks_2_1_transformer_blocks_1_attn2_to_out_0",
        "lora_unet_input_blocks_1_0_in_layers_2",  # a resnet's conv1 (LoCon)
        "lora_unet_input_blocks_3_0_op",  # a downsampler
        "lora_unet_output_blocks_2_2_conv",  # the upsampler after an attention level
        "lora_unet_output_blocks_8_0_skip_connection",
        "lora_te1_text_model_encoder_layers_3_mlp_fc2",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
    ):
        assert name in names, name
    assert names["lora_unet_input_blocks_4_1_proj_in"].path == "down_blocks.1.attentions.0.proj_in"
    assert not any(re.match(r"lora_(unet_(down|mid|up)_block|te_)", n) for n in names)
    for layers in range(c.arch.text_2["num_hidden_layers"]):
        for part in ("q_proj", "k_proj", "v_proj", "out_proj"):
            assert f"lora_te2_text_model_encoder_layers_{layers}_self_attn_{part}" in names
    assert {t.component for t in targets} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(t.is_text == (t.component != "unet") for t in targets)

    checkpoint, _ = read_state_dict(tiny_checkpoint("sdxl"))
    by_name = {UNET.replace(".", "_") + k[len(UNET) :].rsplit(".", 1)[0].replace(".", "_"): v for k, v in
               checkpoint.items() if k.startswith(UNET) and k.endswith(".weight")}  # fmt: skip
    for name, target in names.items():
        if target.component == "unet":
            weight = by_name["model_diffusion_model_" + name[len("lora_unet_") :]]
            assert weight.shape == target.module.weight.shape, name
    assert set(all_layers(c.unet, c.text_encoder, c.text_encoder_2)) >= set(names)


# ------------------------------------------------------------------------------------------- the WebUI's math


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr"])
def test_the_trained_delta_is_the_one_the_webui_applies_from_the_sdxl_file(algorithm):
    """Every adapted SDXL layer (attention, feed-forward, proj, resnet and sampler convs, both text encoders): what
    the adapter adds in training equals what the WebUI computes from the file's tensors."""
    c = sdxl_components()
    network = build_network(c, adapter_settings(algorithm, rank=4, alpha=1.0, conv_rank=4, conv_alpha=3.0))
    randomize(network)
    tensors = network.kohya_tensors()
    network.eval()
    generator = torch.Generator().manual_seed(1)
    inputs = {name: layer_input(target.module, generator) for name, target in network.targets.items()}
    with torch.no_grad():
        base = {name: run_layer(network.targets[name].module, x) for name, x in inputs.items()}
        network.apply()
        adapted = {name: run_layer(network.targets[name].module, x) for name, x in inputs.items()}
        network.restore()
    prefixes = set()
    for name, x in inputs.items():
        layer = network.targets[name].module
        own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        with torch.no_grad():
            expected = run_layer(layer, x, webui_delta(own, layer.weight))
        torch.testing.assert_close(adapted[name] - base[name], expected, atol=2e-5, rtol=1e-4, msg=name)
        prefixes.add(name.split("_", 2)[1] if not name.startswith("lora_unet") else "unet")
    assert prefixes == {"unet", "te1", "te2"}


# ------------------------------------------------------------------------------ the WebUI's name rules, full size


def webui_layer_names(state_dict):
    """The module names the WebUI v1.10.1's ``assign_network_names_to_compvis_modules`` gives an SDXL model, from
    its checkpoint's tensor names (module path = tensor name minus the parameter's name; ``.`` -> ``_``): the UNet
    under ``diffusion_model_``, embedder 0 (CLIP ViT-L, wrapped ``transformer``) under ``0_``, embedder 1
    (OpenCLIP, wrapped ``model``) under ``1_``; with each module's weight shape."""
    embedders = "conditioner.embedders."
    shapes = {}
    for key, value in state_dict.items():
        module, _, parameter = key.rpartition(".")
        if key.startswith(UNET):
            name = "diffusion_model." + module[len(UNET) :]
        elif key.startswith(embedders):
            name = module[len(embedders) :]
        else:
            continue
        if parameter in ("weight", "in_proj_weight"):
            shapes[name.replace(".", "_")] = tuple(value.shape)
    return shapes


def webui_match(base, layers):
    """The module a file's layer name ``base`` is applied to by the WebUI v1.10.1's ``load_network`` for SDXL,
    written from its rules (lora_facts §1.2): lora_te2_ -> OpenCLIP names (``self_attn`` -> ``attn``, fc1/fc2 ->
    c_fc/c_proj), then a q/k/v_proj falls back to the attention module; lora_unet -> diffusion_model;
    lora_te1_text_model -> 0_transformer_text_model.  Returns (module name, weight part) or None."""
    key = base
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", base)
    if m:
        rest = m.group(2).replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        key = f"1_model_transformer_resblocks_{m.group(1)}_{rest}"
    if key in layers:
        return key, None
    m = re.match(r"(.*)_([qkv]_proj)$", key)
    if m and m.group(1) in layers:
        return m.group(1), m.group(2)
    if "lora_unet" in base:
        key = base.replace("lora_unet", "diffusion_model")
    elif "lora_te1_text_model" in base:
        key = base.replace("lora_te1_text_model", "0_transformer_text_model")
    return (key, None) if key in layers else None


@pytest.mark.slow
def test_every_name_maps_to_a_layer_of_the_full_size_sdxl_by_the_webuis_rules():
    """SDXL base 1.0's layout on the meta device: every layer an SDXL LoRA of ours adapts (LoCon convs and both text
    encoders included) is matched by the WebUI's rules to a module of the real SDXL model with the layer's shape
    (q/k/v of OpenCLIP: a third of in_proj), each module once, no name left unmatched; and a name the WebUI's
    diffusers converter would rewrite for the SD UNet's layout is never written."""
    from dreambooth.models.components import (
        Components,
        build_text_encoder,
        build_text_encoder_2,
        build_unet,
        build_vae,
        to_original_state_dict,
    )
    from dreambooth.models.sdxl import BIG_G, standard_sdxl_architecture

    arch = standard_sdxl_architecture()
    with torch.device("meta"):
        c = Components(build_unet(arch), build_vae(arch), build_text_encoder(arch), None, None, arch,
                       text_encoder_2=build_text_encoder_2(arch))  # fmt: skip
        c.extras = {BIG_G + "logit_scale": torch.empty(())}
        state_dict = to_original_state_dict(c)
    assert len(state_dict) == 2515  # the released sd_xl_base_1.0.safetensors
    layers = webui_layer_names(state_dict)
    targets = select_targets(c.unet, c.text_encoder, conv=True, text_encoder_2=c.text_encoder_2)
    plain = select_targets(c.unet, c.text_encoder, conv=False, text_encoder_2=c.text_encoder_2)
    counts = {part: sum(t.component == part for t in plain) for part in ("unet", "text_encoder", "text_encoder_2")}
    assert counts == {"unet": 722, "text_encoder": 72, "text_encoder_2": 192}  # kohya's SDXL LoRA: the same counts
    unmatched, matched = [], {}
    for target in targets:
        assert not re.match(r"lora_unet_(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding)", target.name)
        found = webui_match(target.name, layers)
        if found is None:
            unmatched.append(target.name)
            continue
        module, part = found
        shape = layers[module]
        if part is not None:  # OpenCLIP's fused q/k/v
            shape = (shape[0] // 3, *shape[1:])
        assert shape == tuple(target.module.weight.shape), target.name
        assert (module, part) not in matched, (target.name, matched.get((module, part)))
        matched[(module, part)] = target.name
    assert unmatched == []
    for layer in range(32):
        mha = f"1_model_transformer_resblocks_{layer}_attn"
        assert {p for m, p in matched if m == mha} == {"q_proj", "k_proj", "v_proj"}
        assert (mha + "_out_proj", None) in matched


# ------------------------------------------------------------------------------------------- diffusers' reader


def sdxl_unet_output(c, network=None):
    """The UNet's noise prediction for fixed inputs shaped like SDXL's (context of both encoders, pooled text,
    six time ids)."""
    unet = c.unet
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn((1, 4, 8, 8), generator=generator)
    context = torch.randn((1, 77, unet.config.cross_attention_dim), generator=generator)
    pooled = torch.randn((1, c.arch.text_2["projection_dim"]), generator=generator)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
    if network is not None:
        network.eval()
        network.apply()
    try:
        with torch.no_grad():
            return unet.eval()(
                latents,
                torch.tensor([400]),
                encoder_hidden_states=context,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample
    finally:
        if network is not None:
            network.restore()


def text_outputs(c, network=None):
    ids = c.tokenizer(["photo of zwx ring"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    if network is not None:
        network.eval()
        network.apply()
    try:
        with torch.no_grad():
            first = c.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
            second = c.text_encoder_2(ids, output_hidden_states=True)
            return first, second.hidden_states[-2], second[0]  # penultimate states and the pooled projection
    finally:
        if network is not None:
            network.restore()


def peft_backend() -> bool:
    from diffusers.utils import USE_PEFT_BACKEND

    return bool(USE_PEFT_BACKEND)


@pytest.mark.slow
def test_diffusers_load_lora_weights_reads_our_sdxl_file_as_we_trained_it(tmp_path):
    """diffusers' ``StableDiffusionXLPipeline.load_lora_weights`` (kohya SDXL names: sgm UNet paths, lora_te1_,
    lora_te2_) on the base model gives the UNet's and both text encoders' outputs of our model with its adapter
    (LoCon convs included)."""
    if not peft_backend():
        pytest.skip(
            "diffusers' load_lora_weights needs its PEFT backend, which needs transformers >= 4.34 (this is the "
            "WebUI's transformers 4.30.2 environment); the latest environment runs this test"
        )
    from diffusers import StableDiffusionXLPipeline

    ours = sdxl_components()
    network = build_network(ours, adapter_settings("lora", rank=4, alpha=2.0, conv_rank=2))
    randomize(network, seed=5)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.mul_(0.25)  # a trained-sized delta: visible, far from overflow
    path = write_network_file(tmp_path / "xl.safetensors", network.kohya_tensors(), {})
    base = sdxl_components()  # the same base weights, apart from ours
    pipe = StableDiffusionXLPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer,
        tokenizer_2=base.tokenizer_2,
        unet=base.unet,
        scheduler=base.noise_scheduler,
    )
    before_unet, before_text = sdxl_unet_output(base), text_outputs(base)
    pipe.load_lora_weights(str(path))
    expected_unet, expected_text = sdxl_unet_output(ours, network), text_outputs(ours, network)
    assert (expected_unet - before_unet).abs().max() > 1e-2
    torch.testing.assert_close(sdxl_unet_output(base), expected_unet, rtol=1e-4, atol=1e-5)
    for theirs, mine, plain in zip(text_outputs(base), expected_text, before_text):
        assert (mine - plain).abs().max() > 1e-3
        torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ merge and extract


def module_weights(c):
    """Every parameter of the UNet, both text encoders and the VAE, by component and name."""
    return {
        (part, name): value.detach().clone()
        for part in ("unet", "text_encoder", "text_encoder_2", "vae")
        for name, value in getattr(c, part).named_parameters()
    }


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["lora", "loha", "lokr"])
def test_merge_lora_of_an_sdxl_lora_equals_the_base_plus_the_webuis_delta(tiny_checkpoint, tmp_path, algorithm):
    """merge-lora of an SDXL LoRA / LoHa / LoKr (LoCon convs and both text encoders) at weight 0.5: each adapted
    layer of the written SDXL checkpoint is the base's plus 0.5 x the WebUI's delta from the file; every other
    tensor is the base's, bit for bit."""
    from dreambooth.network.merge import merge_lora

    base = tiny_checkpoint("sdxl")
    c = load_components(base)
    network = build_network(c, adapter_settings(algorithm, rank=4, alpha=2.0, conv_rank=2))
    randomize(network, seed=2)
    tensors = network.kohya_tensors()
    lora = write_network_file(tmp_path / "xl.safetensors", tensors, {"ss_base_model_version": "sdxl_base_v1-0"})
    report = merge_lora(base, lora, tmp_path / "merged.safetensors", weight=0.5)
    assert report.layers == len(network.targets) and report.text_layers == sum(
        t.is_text for t in network.targets.values()
    )
    merged = load_components(tmp_path / "merged.safetensors")
    before, after = module_weights(c), module_weights(merged)
    adapted = set()
    for name, target in network.targets.items():
        key = (target.component, target.path + ".weight")
        own = {k[len(name) + 1 :]: v for k, v in tensors.items() if k.startswith(name + ".")}
        expected = before[key] + 0.5 * webui_delta(own, before[key])
        torch.testing.assert_close(after[key], expected, atol=2e-6, rtol=1e-5, msg=name)
        assert (after[key] - before[key]).abs().max() > 1e-4, name
        adapted.add(key)
    unchanged = [key for key in before if key not in adapted and not torch.equal(before[key], after[key])]
    assert unchanged == []


def test_an_sd_lora_on_sdxl_and_an_sdxl_lora_on_sd_are_refused_in_one_sentence(tiny_checkpoint, tmp_path):
    """By the file's metadata (kohya's ss_base_model_version / ss_v2), and without metadata by its layer names;
    nothing is written."""
    from dreambooth.network.merge import NetworkMismatchError, merge_lora

    sdxl, sd1 = tiny_checkpoint("sdxl"), tiny_checkpoint("sd1-sd")
    sd_network = build_network(tiny_components(tiny_architecture("sd1", layout="sd")), adapter_settings())
    xl_network = build_network(sdxl_components(), adapter_settings())
    files = {
        "sd-labelled": write_network_file(tmp_path / "sd.safetensors", sd_network.kohya_tensors(),
                                          {"ss_base_model_version": "sd_v1", "ss_v2": "False"}),
        "sd-bare": write_network_file(tmp_path / "sdbare.safetensors", sd_network.kohya_tensors(), {}),
        "xl-labelled": write_network_file(tmp_path / "xl.safetensors", xl_network.kohya_tensors(),
                                          {"ss_base_model_version": "sdxl_base_v1-0"}),
        "xl-bare": write_network_file(tmp_path / "xlbare.safetensors", xl_network.kohya_tensors(), {}),
    }  # fmt: skip
    cases = [
        (sdxl, "sd-labelled", "the LoRA was trained on SD 1.x (its metadata says so) but tiny-sdxl.safetensors"),
        (sdxl, "sd-bare", "the LoRA was made for another kind of model (e.g. an SD 1.x / 2.x LoRA on SDXL)"),
        (sd1, "xl-labelled", "the LoRA was trained on SDXL (its metadata says so) but tiny-sd1-sd.safetensors"),
        (sd1, "xl-bare", "is not a layer of tiny-sd1-sd.safetensors"),
    ]
    out = tmp_path / "out.safetensors"
    for base, name, words in cases:
        with pytest.raises(NetworkMismatchError) as caught:
            merge_lora(base, files[name], out)
        message = str(caught.value)
        assert message.startswith(f"{files[name]}: ") and "\n" not in message and words in message, message
        assert not out.exists()


@pytest.mark.slow
def test_extract_lora_from_an_sdxl_fine_tune_recovers_its_difference_in_sdxl_names(tiny_checkpoint, tmp_path):
    """extract-lora TUNED BASE on SDXL, at the rank of a known difference in every LoCon layer and both text
    encoders: the file has kohya's SDXL names and metadata (sdxl_base_v1-0, no ss_v2; the WebUI's card says SDXL),
    and the WebUI's delta of every layer is the known difference."""
    from dreambooth.network.card import read_metadata, sd_version
    from dreambooth.network.extract import extract_lora
    from dreambooth.network.merge import layer_deltas

    base = tiny_checkpoint("sdxl")
    c = load_components(base)
    generator = torch.Generator().manual_seed(4)
    known = {}
    for target in select_targets(c.unet, c.text_encoder, conv=True, text_encoder_2=c.text_encoder_2):
        weight = target.module.weight
        up = torch.randn(weight.shape[0], 2, generator=generator) * 0.1
        down = torch.randn(2, weight[0].numel(), generator=generator) * 0.1
        known[target.name] = (up @ down).reshape(weight.shape)
        weight.data += known[target.name]
    tuned = tmp_path / "tuned.safetensors"
    save_single_file(c, tuned)
    out = tmp_path / "extracted.safetensors"
    report = extract_lora(tuned, base, out, rank=2, conv_rank=2)
    assert report.relative_error < 1e-5 and report.text_encoder and report.layers == len(known)
    network = read_network_file(out)
    assert {n.split("_", 2)[1] for n in network.layers} == {"unet", "te1", "te2"}
    metadata = network.metadata
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and "ss_v2" not in metadata
    assert sd_version(read_metadata(out)) == "SDXL"
    original = load_components(base)
    recovered = layer_deltas(network, all_layers(original.unet, original.text_encoder, original.text_encoder_2))
    assert set(recovered) == set(known)
    for name, delta in known.items():
        torch.testing.assert_close(recovered[name], delta, atol=1e-5, rtol=1e-4, msg=name)


def test_network_init_from_reads_an_sdxl_file_back_and_names_what_does_not_match(tmp_path):
    """An SDXL adapter continues from its own file exactly (both text encoders, LoCon convs); a file with LoCon
    layers for settings without a conv rank, or with text layers for settings without, is refused naming the sgm
    layer and the setting."""
    from dreambooth.errors import DreamBoothError

    c = sdxl_components()
    settings = adapter_settings(conv_rank=2)
    network = build_network(c, settings)
    randomize(network, seed=9)
    path = write_network_file(tmp_path / "xl.safetensors", network.kohya_tensors(), {})
    found = read_network_file(path)
    assert found.algorithm == "lora"
    again = build_network(c, settings, seed=1)
    again.load_kohya_tensors(found.tensors, "network_init_from")
    assert again.kohya_tensors().keys() == network.kohya_tensors().keys()
    assert all(torch.equal(again.kohya_tensors()[k], v) for k, v in network.kohya_tensors().items())
    with pytest.raises(DreamBoothError, match=r"lora_unet_input_blocks_1_0_\w+, .*set network_conv_rank"):
        build_network(c, adapter_settings(conv_rank=0)).load_kohya_tensors(found.tensors)
    with pytest.raises(DreamBoothError, match=r"lora_te1_text_model\w+, .*network_train_text_encoder on"):
        build_network(c, adapter_settings(conv_rank=2, text=False)).load_kohya_tensors(found.tensors)


def test_both_sdxl_text_encoders_get_adapters_at_the_text_learning_rate():
    """network_train_text_encoder on SDXL: adapters on CLIP ViT-L and OpenCLIP ViT-bigG, both in the optimizer's
    text group (network_text_encoder_lr), the UNet's in the UNet group; off: no text adapter at all."""
    c = sdxl_components()
    network = build_network(c, adapter_settings(text=True))
    groups = network.param_groups(unet_lr=1e-4, text_lr=5e-5)
    assert [g["lr"] for g in groups] == [1e-4, 5e-5]
    by_parameter = {id(p): name for name, adapter in network.adapters.items() for p in adapter.parameters()}
    text_group = {by_parameter[id(p)].split("_", 2)[1] for p in groups[1]["params"]}
    unet_group = {by_parameter[id(p)].split("_", 2)[1] for p in groups[0]["params"]}
    assert text_group == {"te1", "te2"} and unet_group == {"unet"}
    assert {id(p) for p in network.text_parameters()} == {id(p) for p in groups[1]["params"]}
    plain = build_network(c, adapter_settings(text=False))
    assert not plain.has_text_encoder and len(plain.param_groups(1e-4, 5e-5)) == 1


# ------------------------------------------------------------------------------------------ the trainer, end to end


@pytest.fixture
def sdxl_lora_settings(make_settings, tiny_checkpoint):
    def make(**changes):
        values = {
            "pretrained_model_name_or_path": str(tiny_checkpoint("sdxl")),
            "training_method": "lora",
            "network_rank": 4,
            "network_alpha": 2.0,
            "network_train_text_encoder": True,
            "with_prior_preservation": True,
            **changes,
        }
        return make_settings(**values)

    return make


def train(settings, **kwargs):
    from dreambooth.train.loop import Trainer

    trainer = Trainer(settings, **kwargs)
    return trainer, trainer.run()


@pytest.mark.slow
def test_a_2_step_sdxl_lora_run_with_prior_preservation_writes_the_webuis_sdxl_file(sdxl_lora_settings, tmp_path):
    """2 steps of an SDXL LoRA with LoCon convs and both text encoders' adapters, with class images: the file names
    exactly the layers an SDXL adapter of these settings adapts (kohya's SDXL names), each of them trained but CLIP
    ViT-L's last layer (SDXL takes its penultimate state; kohya adapts that layer too), kohya's SDXL metadata (the
    WebUI's card says SDXL); the class images were made; the adapter is taken off the model afterwards."""
    from dreambooth.network.card import read_metadata, sd_version

    settings = sdxl_lora_settings(network_conv_rank=2, network_unet_lr=1e-2, network_text_encoder_lr=1e-2)
    trainer, result = train(settings)
    assert result.step == 2 and result.checkpoints[-1].name == "dreambooth_2.safetensors"
    file = read_network_file(result.checkpoints[-1])
    c = trainer.components
    expected = select_targets(c.unet, c.text_encoder, conv=True, text_encoder_2=c.text_encoder_2)
    assert file.layers == {t.name for t in expected} and file.algorithm == "lora"
    untrained = {n for n in file.layers if not file.tensors[f"{n}.lora_up.weight"].any()}  # up starts at zero
    last = c.arch.text["num_hidden_layers"] - 1  # SDXL conditions on CLIP ViT-L's penultimate state: unused
    assert untrained == {n for n in file.layers if n.startswith(f"lora_te1_text_model_encoder_layers_{last}_")}
    assert len(untrained) == 6
    meta = file.metadata
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and "ss_v2" not in meta
    assert meta["ss_num_reg_images"] == "2" and meta["ss_text_encoder_lr"] == "0.01"
    assert sd_version(read_metadata(result.checkpoints[-1])) == "SDXL"
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert not trainer.method.network.is_applied


@pytest.mark.slow
def test_cancel_and_exact_resume_of_an_sdxl_lora(sdxl_lora_settings):
    """Cancelled at step 2 of 4 and resumed: the same SDXL adapter, bit for bit, as 4 steps at once (dropout and
    both text encoders' adapters included)."""
    import dataclasses

    from dreambooth.events import Callbacks, Commands

    common = {"network_dropout": 0.3, "lr_scheduler": "linear", "max_train_steps": 4}
    straight = sdxl_lora_settings(**common)
    _, whole = train(straight)

    class CancelAtTwo(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == 2:
                commands.cancel()

    commands = Commands()
    split = sdxl_lora_settings(output_dir=straight.output_dir + "-split", **common)
    _, part = train(split, callbacks=CancelAtTwo(), commands=commands)
    assert part.cancelled and part.step == 2
    _, rest = train(dataclasses.replace(split, resume_from=str(part.state_dir)))
    assert rest.step == 4
    a, b = read_network_file(whole.checkpoints[-1]).tensors, read_network_file(rest.checkpoints[-1]).tensors
    assert a.keys() == b.keys() and any(k.startswith("lora_te2_") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    halfway = read_network_file(part.checkpoints[-1]).tensors
    assert not all(torch.equal(a[k], halfway[k]) for k in a)
