"""LoRA files (dreambooth/network/files.py): kohya keys, algorithm detection, the WebUI's hash, clear refusals."""

from __future__ import annotations

import hashlib

import pytest
import torch

from dreambooth.errors import ModelFileError
from dreambooth.network.files import read_network_file, write_network_file


def lycoris_layer(kind: str, layer: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """One layer's keys as LyCORIS' module writes them, prefixed with the kohya name."""
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    module = {"lora": LoConModule, "loha": LohaModule, "lokr": LokrModule}[kind](name, layer, 1.0, 4, 2)
    return {f"{name}.{key}": value for key, value in module.state_dict().items()}


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr"])
def test_written_files_read_back_with_their_algorithm_and_alpha(tmp_path, kind):
    tensors = {
        **lycoris_layer(kind, torch.nn.Linear(32, 32), "lora_unet_mid_block_attentions_0_proj_in"),
        **lycoris_layer(kind, torch.nn.Conv2d(32, 32, 3), "lora_unet_down_blocks_0_resnets_0_conv1"),
    }
    path = write_network_file(tmp_path / "subject_2.safetensors", tensors, {"ss_network_dim": "4"})
    read = read_network_file(path)
    assert read.algorithm == kind
    assert read.layers == {"lora_unet_mid_block_attentions_0_proj_in", "lora_unet_down_blocks_0_resnets_0_conv1"}
    # LyCORIS' LoKr with both Kronecker factors full (a rank too big to decompose) stores alpha = rank (scale 1)
    assert read.alpha("lora_unet_mid_block_attentions_0_proj_in") == (4.0 if kind == "lokr" else 2.0)
    assert set(read.tensors) == set(tensors)
    assert all(torch.equal(read.tensors[k], tensors[k]) for k in tensors)
    assert read.metadata["ss_network_dim"] == "4"
    assert [p.name for p in tmp_path.iterdir()] == ["subject_2.safetensors"]  # no temporary file left


def test_the_hash_in_the_metadata_is_the_webui_s_hash_of_the_written_file(tmp_path):
    tensors = lycoris_layer("lora", torch.nn.Linear(512, 512), "lora_unet_conv_in")
    tensors["lora_unet_conv_in.lora_up.weight"] = torch.randn(512, 4)  # non-zero: hashes of zeros prove little
    path = write_network_file(tmp_path / "a.safetensors", tensors, {"ss_output_name": "a", "dreambooth.step": "2"})
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    metadata = read_network_file(path).metadata
    # the WebUI's addnet hash (modules/hashes.py): sha256 of everything after the header, whatever the metadata
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header :]).hexdigest()
    assert len(metadata["sshs_legacy_hash"]) == 8


def test_names_the_prompt_tag_cannot_say_are_refused_and_nothing_is_written(tmp_path):
    tensors = lycoris_layer("lora", torch.nn.Linear(8, 8), "lora_unet_conv_in")
    for name in ("a:b", "a>b", "w=1"):
        with pytest.raises(ModelFileError, match="may not contain"):
            write_network_file(tmp_path / f"{name}.safetensors", tensors, {})
    assert list(tmp_path.iterdir()) == []


def test_files_that_are_not_lora_files_are_refused_in_one_sentence(tmp_path):
    from safetensors.torch import save_file

    full = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, str(full))
    with pytest.raises(ModelFileError, match="full Stable Diffusion checkpoint"):
        read_network_file(full)
    odd = tmp_path / "odd.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4), "emb_params": torch.zeros(2)}, str(odd))
    with pytest.raises(ModelFileError, match="no LoRA, LoHa or LoKr layer"):
        read_network_file(odd)
    with pytest.raises(ModelFileError, match=r"as \.safetensors only"):
        read_network_file(tmp_path / "old.pt")
    with pytest.raises(ModelFileError, match="no such file"):
        read_network_file(tmp_path / "missing.safetensors")
