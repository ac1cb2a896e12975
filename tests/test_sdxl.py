"""SDXL checkpoints: the sgm single-file layout <-> components <-> a diffusers folder, every key kept; detection from
the weights and from a folder's configs; the refiner and SDXL inpainting refused by name; diffusers' own
``StableDiffusionXLPipeline.from_single_file`` as the independent reader of what we write."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from dreambooth.errors import UnsupportedModelError
from dreambooth.models.architecture import detect_architecture, ldm_yaml
from dreambooth.models.components import load_components, save_diffusers_folder, save_single_file
from dreambooth.models.files import read_state_dict, read_yaml
from dreambooth.models.sdxl import BIG_G, CLIP_L_XL

UNET = "model.diffusion_model."


def assert_same_tensors(written: dict, original: dict, half: bool = False) -> None:
    assert set(written) == set(original), set(written) ^ set(original)
    for key, tensor in original.items():
        expected = tensor.half() if half and tensor.is_floating_point() else tensor
        assert written[key].dtype == expected.dtype, key
        assert torch.equal(written[key], expected), key


# ---------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("route", ["file", "diffusers folder", "half"])
def test_sdxl_round_trips_are_exact(tiny_checkpoint, tmp_path, route):
    source = tiny_checkpoint("sdxl")
    original, _ = read_state_dict(source)
    # the keys no diffusers module holds travel too: OpenCLIP's logit_scale, CLIP's position_ids buffer
    assert {BIG_G + "logit_scale", BIG_G + "text_projection", CLIP_L_XL + "embeddings.position_ids"} <= set(original)
    components = load_components(source)
    assert components.arch.family == "sdxl"
    assert type(components.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    if route == "diffusers folder":
        folder = save_diffusers_folder(components, tmp_path / "folder")
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "StableDiffusionXLPipeline"
        assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
        from transformers import CLIPTokenizer

        assert CLIPTokenizer.from_pretrained(str(folder / "tokenizer_2"), local_files_only=True).pad_token == "!"
        components = load_components(folder)
    written = save_single_file(components, tmp_path / "back.safetensors", half=route == "half")
    assert_same_tensors(read_state_dict(written[0])[0], original, half=route == "half")


def test_sdxl_projection_is_transposed_as_diffusers_stores_it(tiny_checkpoint):
    """OpenCLIP computes ``x @ text_projection``; a Linear computes ``x @ weight.T``: the weight is the transpose."""
    original, _ = read_state_dict(tiny_checkpoint("sdxl"))
    components = load_components(tiny_checkpoint("sdxl"))
    weight = components.text_encoder_2.text_projection.weight
    assert torch.equal(weight, original[BIG_G + "text_projection"].T)
    fused = original[BIG_G + "transformer.resblocks.1.attn.in_proj_weight"]
    layer = components.text_encoder_2.text_model.encoder.layers[1].self_attn
    assert torch.equal(torch.cat([layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight]), fused)


def test_sdxl_file_with_a_linear_projection_round_trips(tiny_checkpoint, tmp_path):
    """Some merged SDXL files store bigG's projection as a Linear weight (``text_projection.weight``, transposed):
    read as such, and written back the same way."""
    original, _ = read_state_dict(tiny_checkpoint("sdxl"))
    original[BIG_G + "text_projection.weight"] = original.pop(BIG_G + "text_projection").T.contiguous()
    path = tmp_path / "merged.safetensors"
    save_file(original, str(path))  # no metadata of ours: detected from the tensors
    components = load_components(path)
    assert components.arch.projection_layout == "linear"
    assert torch.equal(components.text_encoder_2.text_projection.weight, original[BIG_G + "text_projection.weight"])
    folder = save_diffusers_folder(components, tmp_path / "folder")
    written = save_single_file(load_components(folder), tmp_path / "back.safetensors")
    assert_same_tensors(read_state_dict(written[0])[0], original)


def test_sdxl_folder_of_another_tool_is_read_from_its_configs(tiny_checkpoint, tmp_path):
    """A diffusers SDXL folder without our record (as from the hub or another trainer): detected from its configs
    (text_encoder_2/, the UNet's addition_embed_type 'text_time'), loaded and written as the same single file."""
    source = tiny_checkpoint("sdxl")
    folder = save_diffusers_folder(load_components(source), tmp_path / "folder")
    (folder / "dreambooth.json").unlink()
    (folder / "dreambooth_extras.safetensors").unlink()  # such a folder has no logit_scale
    components = load_components(folder)
    assert (components.arch.family, components.arch.prediction_source) == ("sdxl", "config")
    written = save_single_file(components, tmp_path / "back.safetensors")
    original, _ = read_state_dict(source)
    del original[BIG_G + "logit_scale"]
    assert_same_tensors(read_state_dict(written[0])[0], original)


# ------------------------------------------------------------------------------------------------ detection


def test_sdxl_structure_is_derived_from_weights_and_yaml(tiny_checkpoint):
    """Without our metadata: shapes from the tensors (per-level transformer depth, the time embedding's width from
    label_emb), head size from the sidecar yaml."""
    source = tiny_checkpoint("sdxl")
    state_dict, metadata = read_state_dict(source)
    expected = detect_architecture(state_dict, "x", metadata=metadata)
    derived = detect_architecture(state_dict, "x", yaml_config=read_yaml(source.with_suffix(".yaml")))
    assert (derived.family, derived.prediction_type, derived.name) == ("sdxl", "epsilon", "SDXL (non-standard size)")
    for part in ("unet", "vae", "text", "text_2"):
        for key, value in getattr(expected, part).items():
            if key != "sample_size":  # not in the weights: the released 1024 px
                assert getattr(derived, part)[key] == value, (part, key)
    assert derived.unet["transformer_layers_per_block"] == [1, 1, 2]
    assert derived.unet["addition_time_embed_dim"] == 8


def test_sdxl_sidecar_yaml_is_sd_xl_base_with_the_sizes_changed(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("sdxl")
    params = read_yaml(source.with_suffix(".yaml"))["model"]["params"]
    assert params["scale_factor"] == 0.13025
    network = params["network_config"]["params"]
    assert network["adm_in_channels"] == 6 * 8 + 64  # six time ids of 8 + the pooled 64
    assert (network["context_dim"], network["transformer_depth"], network["num_head_channels"]) == (96, [1, 1, 2], 32)
    assert (network["model_channels"], network["channel_mult"], network["attention_resolutions"]) == (
        32,
        [1, 2, 2],
        [4, 2],
    )
    embedders = params["conditioner_config"]["params"]["emb_models"]
    assert embedders[0]["params"] == {
        "layer": "hidden",
        "layer_idx": 3,
        "version": str((source.parent / "tiny-sdxl-clip").resolve()),
    }
    assert [e["params"]["outdim"] for e in embedders[2:]] == [8, 8, 8]
    # v-prediction is the denoiser's VScaling in sgm configs: read from a yaml beside the file, and written back
    copy = tmp_path / "v.safetensors"
    shutil.copy(source, copy)
    config = read_yaml(source.with_suffix(".yaml"))
    scaling = config["model"]["params"]["denoiser_config"]["params"]["scaling_config"]
    scaling["target"] = scaling["target"].replace("EpsScaling", "VScaling")
    copy.with_suffix(".yaml").write_text(json.dumps(config))
    arch = load_components(copy).arch
    assert (arch.prediction_type, arch.prediction_source, arch.name) == (
        "v_prediction",
        "yaml",
        "SDXL (v-prediction) (non-standard size)",
    )
    written = ldm_yaml(arch)["model"]["params"]["denoiser_config"]["params"]["scaling_config"]["target"]
    assert written.endswith("denoiser_scaling.VScaling")


def meta_sdxl_state_dict() -> tuple[dict, object]:
    """The full-size SDXL base 1.0 file's names and shapes on the meta device (no memory)."""
    from dreambooth.models.components import (
        Components,
        build_text_encoder,
        build_text_encoder_2,
        build_unet,
        build_vae,
        to_original_state_dict,
    )
    from dreambooth.models.sdxl import standard_sdxl_architecture

    arch = standard_sdxl_architecture()
    with torch.device("meta"):
        components = Components(
            build_unet(arch),
            build_vae(arch),
            build_text_encoder(arch),
            None,
            None,
            arch,
            text_encoder_2=build_text_encoder_2(arch),
        )
        components.extras = {BIG_G + "logit_scale": torch.empty(())}
    return to_original_state_dict(components), arch


def test_full_size_sdxl_key_layout_maps_both_ways():
    from dreambooth.models.components import build_text_encoder, build_text_encoder_2, build_unet, build_vae
    from dreambooth.models.keymap import join_original, split_original

    state_dict, built = meta_sdxl_state_dict()
    # the released sd_xl_base_1.0.safetensors: 2515 tensors, 1680 of them the UNet's
    assert len(state_dict) == 2515
    assert sum(k.startswith(UNET) for k in state_dict) == 1680
    assert sum(k.startswith(CLIP_L_XL) for k in state_dict) == 197
    assert sum(k.startswith(BIG_G) for k in state_dict) == 390
    shapes = {
        UNET + "label_emb.0.0.weight": (1280, 2816),
        UNET + "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight": (1280, 2048),
        UNET + "middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
        UNET + "output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),  # upsampler after an attention level
        UNET + "output_blocks.8.0.skip_connection.weight": (320, 640, 1, 1),
        CLIP_L_XL + "encoder.layers.11.self_attn.q_proj.weight": (768, 768),
        BIG_G + "transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
        BIG_G + "text_projection": (1280, 1280),
        BIG_G + "positional_embedding": (77, 1280),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
    }
    for name, shape in shapes.items():
        assert tuple(state_dict[name].shape) == shape, name
    arch = detect_architecture(state_dict, "meta")
    assert (arch.name, arch.is_standard_size, arch.needs_sidecar_yaml) == ("SDXL", True, False)
    for part in ("unet", "vae", "text", "text_2"):
        assert getattr(arch, part) == getattr(built, part), part
    # original -> diffusers: every tensor has its place in a module, no module tensor is missing
    parts = split_original(state_dict, arch, "meta")
    with torch.device("meta"):
        modules = {
            "unet": build_unet(arch),
            "vae": build_vae(arch),
            "text_encoder": build_text_encoder(arch),
            "text_encoder_2": build_text_encoder_2(arch),
        }
    from dreambooth.compat import text_encoder_state_dict

    for name, module in modules.items():
        own = text_encoder_state_dict(module) if name.startswith("text") else module.state_dict()
        assert set(parts[name]) == set(own), name
        assert all(parts[name][k].shape == own[k].shape for k in own), name
    assert set(parts["extras"]) == {BIG_G + "logit_scale", CLIP_L_XL + "embeddings.position_ids"}
    # ... and back: the same names and shapes
    back = join_original(
        parts["unet"], parts["vae"], parts["text_encoder"], arch, parts["extras"], text_2_sd=parts["text_encoder_2"]
    )
    assert set(back) == set(state_dict)
    assert all(back[k].shape == state_dict[k].shape for k in state_dict)


def _variant_file(tiny_checkpoint, tmp_path, change) -> object:
    state_dict, _ = read_state_dict(tiny_checkpoint("sdxl"))
    state_dict = change(dict(state_dict))
    path = tmp_path / "variant.safetensors"
    save_file(state_dict, str(path))
    return path


def _as_refiner(sd: dict) -> dict:
    """The refiner's layout: only OpenCLIP bigG, as embedders.0."""
    out = {k: v for k, v in sd.items() if not k.startswith("conditioner.embedders.0.")}
    return {k.replace("conditioner.embedders.1.", "conditioner.embedders.0."): v for k, v in out.items()}


def _as_inpainting(sd: dict) -> dict:
    conv_in = sd[UNET + "input_blocks.0.0.weight"]
    sd[UNET + "input_blocks.0.0.weight"] = torch.zeros(conv_in.shape[0], 9, *conv_in.shape[2:])
    return sd


@pytest.mark.parametrize(
    ("change", "words"),
    [(_as_refiner, "the SDXL refiner is not supported yet"), (_as_inpainting, "SDXL inpainting is not supported yet")],
    ids=["refiner", "inpainting"],
)
def test_sdxl_refiner_and_inpainting_files_are_refused_by_name(tiny_checkpoint, tmp_path, change, words):
    path = _variant_file(tiny_checkpoint, tmp_path, change)
    with pytest.raises(UnsupportedModelError, match=words) as error:
        load_components(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("variant", ["refiner", "inpainting"])
def test_sdxl_refiner_and_inpainting_folders_are_refused_by_name(tiny_checkpoint, tmp_path, variant):
    folder = save_diffusers_folder(load_components(tiny_checkpoint("sdxl")), tmp_path / variant)
    (folder / "dreambooth.json").unlink()
    config = json.loads((folder / "unet" / "config.json").read_text())
    if variant == "refiner":
        shutil.rmtree(folder / "text_encoder")
        config["requires_aesthetics_score"] = True
    else:
        config["in_channels"] = 9
    (folder / "unet" / "config.json").write_text(json.dumps(config))
    words = "the SDXL refiner" if variant == "refiner" else "SDXL inpainting"
    with pytest.raises(UnsupportedModelError, match=f"{words} is not supported yet"):
        load_components(folder)


def test_sdxl_is_described_and_accepted_for_training(tiny_checkpoint, make_settings, capsys):
    """info / convert work; the settings of an SDXL run validate (the trainer: tests/test_sdxl_train.py)."""
    from dreambooth.cli import main

    source = tiny_checkpoint("sdxl")
    assert main(["info", str(source)]) == 0
    out = capsys.readouterr().out
    assert "SDXL (non-standard size)" in out and "second text encoder: 4 layers, hidden 64, projection 64" in out
    from dreambooth.models.describe import describe_checkpoint  # what the tab shows for the base model

    assert "**SDXL (non-standard size)**" in describe_checkpoint(source)
    assert "text encoder 4 layers of 32 + 4 layers of 64" in describe_checkpoint(source)
    problems = make_settings(pretrained_model_name_or_path=str(source)).validate()
    assert problems == [], problems


# ---------------------------------------------------------------------------------------- independent reader


@pytest.mark.slow  # diffusers' SDXL pipeline import and single-file loader: about 15 s alone, more on a busy machine
def test_diffusers_from_single_file_reads_our_sdxl_file(tiny_checkpoint, tmp_path):
    """diffusers' own SDXL loader, given our diffusers folder as its local config (no hub: ``config=`` a folder and
    ``local_files_only``; no ``original_config``: with it diffusers 0.31 takes its legacy path, which does not find the
    tokenizers in the folder), computes what our components compute."""
    from diffusers import StableDiffusionXLPipeline

    ours = load_components(tiny_checkpoint("sdxl"))
    with torch.no_grad():  # the file under test is one we wrote, not the fixture
        for module in ours.modules:
            for parameter in module.parameters():
                parameter.add_(0.01 * torch.randn_like(parameter))
    written = save_single_file(ours, tmp_path / "model.safetensors")
    config_folder = save_diffusers_folder(ours, tmp_path / "configs")
    pipe = StableDiffusionXLPipeline.from_single_file(str(written[0]), config=str(config_folder), local_files_only=True)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, ours.arch.unet["cross_attention_dim"], generator=generator)
    added = {
        "text_embeds": torch.randn(2, ours.arch.text_2["projection_dim"], generator=generator),
        "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64], [96, 64, 16, 0, 64, 64]]),
    }
    image = torch.rand(1, 3, 64, 64, generator=generator) * 2 - 1
    with torch.no_grad():
        for t in (torch.tensor([10, 990]), torch.tensor([500, 500])):
            a = ours.unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            b = pipe.unet(latents, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(
            ours.vae.encode(image).latent_dist.mean, pipe.vae.encode(image).latent_dist.mean, rtol=0, atol=1e-6
        )
        torch.testing.assert_close(ours.vae.decode(latents).sample, pipe.vae.decode(latents).sample, rtol=0, atol=1e-6)
        for mine, theirs, tokenizer in (
            (ours.text_encoder, pipe.text_encoder, ours.tokenizer),
            (ours.text_encoder_2, pipe.text_encoder_2, ours.tokenizer_2),
        ):
            ids = tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
            a, b = mine(ids, output_hidden_states=True), theirs(ids, output_hidden_states=True)
            for x, y in zip(a.hidden_states, b.hidden_states):
                torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
            torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-6)
        pooled_ours = ours.text_encoder_2(ids).text_embeds
        torch.testing.assert_close(pooled_ours, pipe.text_encoder_2(ids).text_embeds, rtol=0, atol=1e-6)
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
