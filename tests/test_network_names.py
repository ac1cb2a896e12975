"""LoRA layer choice and names (dreambooth/network/names.py): kohya's layers, kohya's names, in both environments."""

from __future__ import annotations

from dreambooth.models.tiny import tiny_architecture, tiny_components
from dreambooth.network.names import all_layers, kohya_name, select_targets, split_key


def sd_shaped():
    return tiny_components(tiny_architecture("sd1", layout="sd"))


def test_names_are_module_paths_with_underscores_and_the_text_model_prefix_always():
    assert kohya_name("unet", "down_blocks.0.attentions.1.proj_in") == "lora_unet_down_blocks_0_attentions_1_proj_in"
    expected = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    # transformers 4 paths carry text_model., transformers 5 paths do not: both give the WebUI's name
    assert kohya_name("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj") == expected
    assert kohya_name("text_encoder", "encoder.layers.0.self_attn.q_proj") == expected
    assert split_key("lora_unet_conv_in.lora_down.weight") == ("lora_unet_conv_in", "lora_down.weight")


def test_without_conv_rank_only_transformer_blocks_and_text_attention_and_mlp_are_adapted():
    c = sd_shaped()
    targets = select_targets(c.unet, c.text_encoder, conv=False)
    names = {t.name for t in targets}
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_mid_block_attentions_0_proj_out" in names
    assert "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_ff_net_2" in names
    assert "lora_te_text_model_encoder_layers_3_mlp_fc1" in names
    assert not any("resnets" in n or "samplers" in n or "conv_in" in n for n in names)
    assert not any(t.conv for t in targets)
    per_text_layer = {n.rsplit("_layers_", 1)[1].split("_", 1)[1] for n in names if n.startswith("lora_te_")}
    assert per_text_layer == {"self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj",
                              "mlp_fc1", "mlp_fc2"}  # fmt: skip
    assert len(names) == len(targets)  # each layer once


def test_conv_rank_adds_resnets_and_samplers_with_3x3_convs_marked():
    c = sd_shaped()
    plain = {t.name for t in select_targets(c.unet, None, conv=False)}
    conv = {t.name: t for t in select_targets(c.unet, None, conv=True)}
    added = set(conv) - plain
    assert plain < set(conv)
    assert "lora_unet_down_blocks_0_resnets_1_conv1" in added and conv["lora_unet_down_blocks_0_resnets_1_conv1"].conv
    assert "lora_unet_down_blocks_0_downsamplers_0_conv" in added
    assert "lora_unet_up_blocks_0_upsamplers_0_conv" in added
    assert not conv["lora_unet_down_blocks_0_resnets_0_time_emb_proj"].conv  # Linear: network rank
    assert not any(n.startswith("lora_te") for n in conv)  # no text encoder given


def test_all_layers_names_every_linear_and_conv_for_reading_other_files():
    c = sd_shaped()
    layers = all_layers(c.unet, c.text_encoder)
    assert {"lora_unet_conv_in", "lora_unet_conv_out", "lora_unet_time_embedding_linear_1"} <= set(layers)
    assert {t.name for t in select_targets(c.unet, c.text_encoder, conv=True)} <= set(layers)
