"""Architecture detection from the weights, the sidecar yaml and our metadata; clear errors for other files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from dreambooth.errors import ModelFileError
from dreambooth.models.architecture import detect_architecture
from dreambooth.models.components import load_components, to_original_state_dict
from dreambooth.models.files import read_state_dict, read_yaml


@pytest.mark.parametrize(
    ("variant", "family", "prediction", "inpainting"),
    [
        ("sd1", "sd1", "epsilon", False),
        ("sd2-v", "sd2", "v_prediction", False),
        ("sd2-eps", "sd2", "epsilon", False),
        ("sd1-inpainting", "sd1", "epsilon", True),
    ],
)
def test_each_tiny_variant_is_recognised(tiny_checkpoint, variant, family, prediction, inpainting):
    arch = load_components(tiny_checkpoint(variant)).arch
    assert (arch.family, arch.prediction_type, arch.is_inpainting) == (family, prediction, inpainting)


@pytest.mark.parametrize("variant", ["sd1", "sd2-v", "sd1-inpainting"])
def test_structure_is_derived_from_weights_alone(tiny_checkpoint, variant):
    """Without metadata, the yaml supplies only heads and parameterization; shapes come from the tensors."""
    state_dict, metadata = read_state_dict(tiny_checkpoint(variant))
    expected = detect_architecture(state_dict, "x", metadata=metadata)
    derived = detect_architecture(state_dict, "x", yaml_config=read_yaml(tiny_checkpoint(variant).with_suffix(".yaml")))
    assert derived.family == expected.family
    assert derived.prediction_type == expected.prediction_type
    for key, value in expected.unet.items():
        assert derived.unet[key] == value, key
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "in_channels"):
        assert derived.vae[key] == expected.vae[key], key
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size", "hidden_act"):
        assert derived.text[key] == expected.text[key], key


def test_sidecar_yaml_decides_the_parameterization(tiny_checkpoint, tmp_path):
    """The same weights as v-prediction or epsilon, depending on the yaml beside them (the WebUI convention)."""
    source = tiny_checkpoint("sd2-eps")
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(source.read_bytes())
    assert load_components(copy).arch.prediction_type == "epsilon"  # from our metadata
    v_yaml = tiny_checkpoint("sd2-v").with_suffix(".yaml")
    (tmp_path / "model.yaml").write_text(v_yaml.read_text())
    arch = load_components(copy).arch
    assert (arch.prediction_type, arch.prediction_source) == ("v_prediction", "yaml")


def test_file_without_metadata_or_yaml_is_detected_from_tensors(tiny_checkpoint, tmp_path):
    state_dict, _ = read_state_dict(tiny_checkpoint("sd2-v"))
    bare = tmp_path / "bare.safetensors"
    save_file(state_dict, str(bare))
    arch = load_components(bare).arch
    assert arch.family == "sd2"
    assert arch.prediction_source == "default"  # tiny: the WebUI's v-test is only meaningful at real size


def meta_original_state_dict(family: str) -> dict:
    """A full-size SD 1.5 / SD 2.1 state dict on the meta device (names and shapes, no memory)."""
    from dreambooth.models.architecture import detect_architecture as detect  # noqa: F401
    from dreambooth.models.components import Components, build_text_encoder, build_unet, build_vae
    from dreambooth.models.tiny import tiny_architecture

    arch = tiny_architecture(family)
    arch.unet.update(
        block_out_channels=[320, 640, 1280, 1280],
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        layers_per_block=2,
        cross_attention_dim=768 if family == "sd1" else 1024,
        attention_head_dim=8 if family == "sd1" else [5, 10, 20, 20],
        sample_size=64,
    )
    arch.vae.update(block_out_channels=[128, 256, 512, 512], layers_per_block=2, sample_size=256)
    hidden = 768 if family == "sd1" else 1024
    layers = 12 if family == "sd1" else 23
    arch.text.update(
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
    )
    arch.text_blocks_in_file = layers if family == "sd1" else layers + 1
    with torch.device("meta"):
        components = Components(build_unet(arch), build_vae(arch), build_text_encoder(arch), None, None, arch)
    if family == "sd2":
        block = "cond_stage_model.model.transformer.resblocks.23."
        components.extras = {block + "ln_1.weight": torch.empty(hidden, device="meta")}
    return to_original_state_dict(components), arch


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_key_layout(family):
    """The names of the real SD 1.5 / 2.1 files, checked on a full-size layout built on the meta device."""
    state_dict, built = meta_original_state_dict(family)
    expected_names = [
        "model.diffusion_model.input_blocks.3.0.op.weight",
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.output_blocks.2.1.conv.weight",  # upsampler of the attention-free level
        "model.diffusion_model.output_blocks.5.2.conv.weight",
        "model.diffusion_model.output_blocks.11.1.proj_out.weight",
        "model.diffusion_model.time_embed.2.weight",
        "model.diffusion_model.out.2.bias",
        "first_stage_model.encoder.down.3.block.1.conv2.weight",
        "first_stage_model.encoder.down.2.downsample.conv.weight",
        "first_stage_model.decoder.up.3.upsample.conv.weight",
        "first_stage_model.decoder.up.0.block.2.conv1.weight",
        "first_stage_model.encoder.mid.attn_1.q.weight",
        "first_stage_model.decoder.norm_out.weight",
        "first_stage_model.post_quant_conv.weight",
    ]
    if family == "sd1":
        expected_names += [
            "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
            "cond_stage_model.transformer.text_model.final_layer_norm.weight",
        ]
    else:
        expected_names += [
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight",
            "cond_stage_model.model.transformer.resblocks.23.ln_1.weight",
            "cond_stage_model.model.positional_embedding",
            "cond_stage_model.model.ln_final.bias",
        ]
    for name in expected_names:
        assert name in state_dict, name
    assert state_dict["first_stage_model.encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert (
        sum(k.startswith("model.diffusion_model.") for k in state_dict) == 686
    )  # as in the released SD 1.5 and 2.1 files
    arch = detect_architecture(state_dict, "meta")
    assert arch.family == family
    assert arch.is_standard_size
    assert arch.needs_sidecar_yaml == (family == "sd2")
    assert arch.unet["attention_head_dim"] == built.unet["attention_head_dim"]
    assert arch.text["num_hidden_layers"] == built.text["num_hidden_layers"]
    assert arch.text_blocks_in_file == (12 if family == "sd1" else 24)


def test_open_clip_mapping_keeps_all_blocks():
    """24 OpenCLIP blocks -> a 23-layer encoder + the 24th block and projection left over, and back again."""
    from dreambooth.models.keymap import open_clip_to_transformers, transformers_to_open_clip

    hidden = 8
    original = {
        "token_embedding.weight": torch.randn(10, hidden),
        "positional_embedding": torch.randn(77, hidden),
    }
    original["ln_final.weight"], original["ln_final.bias"] = torch.randn(hidden), torch.randn(hidden)
    original["text_projection"] = torch.randn(hidden, hidden)
    for i in range(24):
        block = f"transformer.resblocks.{i}."
        original[block + "attn.in_proj_weight"] = torch.randn(3 * hidden, hidden)
        original[block + "attn.in_proj_bias"] = torch.randn(3 * hidden)
        for name in ("ln_1", "ln_2", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            original[block + name + ".weight"] = torch.randn(hidden, hidden)
            original[block + name + ".bias"] = torch.randn(hidden)
    converted, left = open_clip_to_transformers(original, layers=23)
    assert "text_model.encoder.layers.22.self_attn.v_proj.bias" in converted
    assert not any("layers.23." in k for k in converted)
    assert set(left) == {k for k in original if k.startswith("transformer.resblocks.23.")} | {"text_projection"}
    q = converted["text_model.encoder.layers.5.self_attn.q_proj.weight"]
    assert torch.equal(q, original["transformer.resblocks.5.attn.in_proj_weight"][:hidden])
    back = transformers_to_open_clip(converted)
    back.update(left)
    assert set(back) == set(original)
    for key, tensor in original.items():
        assert torch.equal(back[key], tensor), key


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty"),
        (b"hello, this is not a model", "not a readable safetensors"),
    ],
)
def test_unreadable_files_give_a_clear_error(tmp_path, content, message):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=message) as error:
        load_components(path)
    assert str(path) in str(error.value)


def test_truncated_file_gives_a_clear_error(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint("sd1").read_bytes()
    path = tmp_path / "truncated.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_components(path)


def test_non_sd_state_dicts_are_refused_with_a_reason(tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0.alpha": torch.tensor(1.0)}, str(lora))
    with pytest.raises(ModelFileError, match=r"no UNet weights.*not a Stable Diffusion"):
        load_components(lora)
    sdxl = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.x": torch.zeros(1), "conditioner.embedders.0.x": torch.zeros(1)}, str(sdxl))
    with pytest.raises(ModelFileError, match="SDXL"):
        load_components(sdxl)


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    state_dict, _ = read_state_dict(tiny_checkpoint("sd1"))
    del state_dict["first_stage_model.post_quant_conv.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(state_dict, str(path))
    with pytest.raises(ModelFileError, match=r"post_quant_conv\.weight"):
        load_components(path)


def test_sidecar_yaml_names_the_text_model_folder_over_our_metadata(tiny_checkpoint, tmp_path):
    """A checkpoint whose CLIP folder moved (yaml fixed by hand, header still naming the old place) must keep the
    yaml's folder: the WebUI loads the model through that yaml, and our output's yaml is written from it."""
    import shutil

    from dreambooth.models.architecture import ldm_yaml

    source = tiny_checkpoint("sd1")
    old_clip = source.parent / "tiny-sd1-clip"
    new_clip = tmp_path / "moved" / "tiny-sd1-clip"
    shutil.copytree(old_clip, new_clip)
    copy = tmp_path / "model.safetensors"
    copy.write_bytes(source.read_bytes())
    yaml_text = source.with_suffix(".yaml").read_text()
    assert str(old_clip.resolve()) in yaml_text
    (tmp_path / "model.yaml").write_text(yaml_text.replace(str(old_clip.resolve()), str(new_clip)))
    arch = load_components(copy).arch
    assert arch.clip_version == str(new_clip)
    assert ldm_yaml(arch)["model"]["params"]["cond_stage_config"]["params"]["version"] == str(new_clip)
