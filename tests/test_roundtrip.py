"""Original single file -> components -> original single file keeps every key and tensor."""

from __future__ import annotations

import os
import stat
import zipfile

import pytest
import torch

from dreambooth.models.components import load_components, save_diffusers_folder, save_single_file
from dreambooth.models.files import read_state_dict


def assert_same_tensors(written: dict, original: dict, half: bool = False) -> None:
    assert set(written) == set(original)
    for key, tensor in original.items():
        expected = tensor.half() if half and tensor.is_floating_point() else tensor
        assert written[key].dtype == expected.dtype, key
        assert torch.equal(written[key], expected), key


@pytest.mark.parametrize("variant", ["sd1", "sd2-v", "sd1-inpainting"])
def test_file_to_components_to_file_is_exact(tiny_checkpoint, tmp_path, variant):
    source = tiny_checkpoint(variant)
    written = save_single_file(load_components(source), tmp_path / "out.safetensors")
    assert written[0].exists()
    assert_same_tensors(read_state_dict(written[0])[0], read_state_dict(source)[0])


@pytest.mark.parametrize("variant", ["sd1", "sd2-v"])
def test_round_trip_through_a_diffusers_folder_is_exact(tiny_checkpoint, tmp_path, variant):
    source = tiny_checkpoint(variant)
    folder = save_diffusers_folder(load_components(source), tmp_path / "folder")
    assert (folder / "unet" / "config.json").is_file() and (folder / "model_index.json").is_file()
    written = save_single_file(load_components(folder), tmp_path / "back.safetensors")
    assert_same_tensors(read_state_dict(written[0])[0], read_state_dict(source)[0])


@pytest.mark.parametrize("variant", ["sd1", "sd2-v"])
def test_half_precision_round_trip_is_within_fp16_rounding(tiny_checkpoint, tmp_path, variant):
    source = tiny_checkpoint(variant)
    written = save_single_file(load_components(source), tmp_path / "half.safetensors", half=True)
    original = read_state_dict(source)[0]
    assert_same_tensors(read_state_dict(written[0])[0], original, half=True)


def test_sd2_file_keeps_the_last_text_block_and_the_projection(tiny_checkpoint):
    components = load_components(tiny_checkpoint("sd2-v"))
    arch = components.arch
    last = f"cond_stage_model.model.transformer.resblocks.{arch.text_blocks_in_file - 1}.attn.in_proj_weight"
    assert arch.text["num_hidden_layers"] == arch.text_blocks_in_file - 1  # penultimate layer is what SD 2 uses
    assert last in components.extras
    assert "cond_stage_model.model.text_projection" in components.extras


def test_ckpt_output_is_legacy_format_and_loads_safely(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("sd1")
    written = save_single_file(load_components(source), tmp_path / "out.ckpt")[0]
    assert not zipfile.is_zipfile(written)  # the legacy format the WebUI's safe unpickler accepts
    loaded = torch.load(written, map_location="cpu", weights_only=True)
    assert set(loaded) == {"state_dict"}
    assert_same_tensors(loaded["state_dict"], read_state_dict(source)[0])


def test_sidecar_yaml_is_written_for_non_standard_models(tiny_checkpoint, tmp_path):
    import yaml

    written = save_single_file(load_components(tiny_checkpoint("sd2-v")), tmp_path / "m.safetensors")
    assert [p.name for p in written] == ["m.safetensors", "m.yaml"]
    params = yaml.safe_load(written[1].read_text())["model"]["params"]
    assert params["parameterization"] == "v"
    assert params["unet_config"]["params"]["model_channels"] == 32
    assert params["cond_stage_config"]["params"]["layer"] == "penultimate"


def test_components_load_on_the_requested_dtype(tiny_checkpoint):
    components = load_components(tiny_checkpoint("sd1"), dtype=torch.float16)
    for module in (components.unet, components.vae, components.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float16}
        assert not any(p.requires_grad for p in module.parameters())


def test_components_from_an_in_memory_state_dict(tiny_checkpoint):
    """Inside the WebUI the trainer starts from ``shared.sd_model.state_dict()``: no file involved."""
    from dreambooth.models.components import components_from_state_dict, to_original_state_dict

    state_dict, _ = read_state_dict(tiny_checkpoint("sd1"))
    yaml_config = __import__("yaml").safe_load(tiny_checkpoint("sd1").with_suffix(".yaml").read_text())
    components = components_from_state_dict(dict(state_dict), "loaded model", yaml_config=yaml_config)
    assert components.arch.family == "sd1" and components.source == "loaded model"
    assert_same_tensors(to_original_state_dict(components), state_dict)


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_written_checkpoints_get_the_users_file_mode(tmp_path):
    """Seen in the real WebUI: every checkpoint and yaml landed 0600 (mkstemp's mode), unlike all other files in
    models/Stable-diffusion, so another account (a shared model folder, a container's volume) could not read them.
    Written files take the mode any new file gets under the umask."""
    from dreambooth.models.files import atomic_path

    previous = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "model.safetensors") as temp:
            temp.write_bytes(b"weights")
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "model.safetensors").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left
