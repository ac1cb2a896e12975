"""The tiny SDXL recipe the real WebUI v1.10.1 loads (README, developer notes): its sidecar yaml names, for the
second text encoder, an open_clip model config that fits the file's tensors.

The WebUI builds that encoder with ``open_clip.create_model_and_transforms(arch)`` (sgm's ``FrozenOpenCLIPEmbedder2``)
and loads the file with ``strict=False``: a config of another size fails on a shape, and only registered names
exist.  open_clip itself is not importable in the test environments (it needs torchvision), so the config is checked
against the file's shapes here, and in the real WebUI by hand (/work/webui-real/NOTES.md).
"""

from __future__ import annotations

import json

from dreambooth.models.files import read_state_dict, read_yaml
from dreambooth.models.sdxl import BIG_G, open_clip_name, sgm_yaml, standard_sdxl_architecture
from dreambooth.models.tiny import write_tiny_checkpoint


def _second_embedder(yaml_config: dict) -> dict:
    models = yaml_config["model"]["params"]["conditioner_config"]["params"]["emb_models"]
    [embedder] = [m for m in models if m["target"].endswith("FrozenOpenCLIPEmbedder2")]
    return embedder["params"]


def test_the_released_size_names_vit_bigg_and_its_weights():
    params = _second_embedder(sgm_yaml(standard_sdxl_architecture()))
    assert (params["arch"], params["version"]) == ("ViT-bigG-14", "laion2b_s39b_b160k")  # sd_xl_base.yaml's


def test_the_tiny_sdxl_yaml_names_an_open_clip_config_that_fits_its_tensors(tmp_path):
    path = write_tiny_checkpoint(tmp_path, family="sdxl", name="tiny-sdxl")
    params = _second_embedder(read_yaml(path.with_suffix(".yaml")))
    assert params["arch"] == "sdxl-text2-w64-l4-h1-p64" and params["version"] is None  # no pretrained weights
    config = json.loads((tmp_path / "tiny-sdxl-clip" / f"{params['arch']}.json").read_text())
    tensors, _ = read_state_dict(path)
    text = config["text_cfg"]
    width, layers = text["width"], text["layers"]
    assert tensors[BIG_G + "positional_embedding"].shape == (text["context_length"], width)
    assert tensors[BIG_G + "token_embedding.weight"].shape == (text["vocab_size"], width)
    blocks = {k[len(BIG_G) :].split(".")[2] for k in tensors if k.startswith(BIG_G + "transformer.resblocks.")}
    assert blocks == {str(i) for i in range(layers)}
    # open_clip 2.20 (the WebUI's pin) builds every text MLP 4x its width: the tiny encoder must be shaped so
    assert tensors[BIG_G + "transformer.resblocks.0.mlp.c_fc.weight"].shape == (4 * width, width)
    assert tensors[BIG_G + "text_projection"].shape == (width, config["embed_dim"])
    assert width % text["heads"] == 0


def test_the_name_spells_the_sizes_so_another_tiny_encoder_cannot_take_a_wrong_config():
    arch = standard_sdxl_architecture()
    arch.text_2 = {**arch.text_2, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    arch.text_2["projection_dim"] = 64
    assert open_clip_name(arch) == "sdxl-text2-w64-l2-h2-p64"
