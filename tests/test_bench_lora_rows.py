"""Our LoRA bench rows: the settings they train with and the layers they adapt, beside diffusers' LoRA script."""

from __future__ import annotations

import tempfile

import pytest

from dreambooth import bench, bench_lora


def _spec(**changes):
    return {
        "scale": "tiny64",
        "mode": "default",
        "prior": False,
        "train_text": False,
        "batch": 1,
        "steps": 2,
        "warmup": 0,
        "method": "lora",
        "rank": 4,
        "targets": "kohya",
        "learning_rate": 1e-4,
        **changes,
    }


def _script_parameters(unet, text_encoder, rank):
    """What train_dreambooth_lora.py's LoraConfig adapts, counted from its target names (peft matches them as
    name suffixes): rank x (in + out) per Linear, the Gaussian lora_A and the zero lora_B."""
    import torch

    def count(model, names):
        return sum(
            rank * (module.in_features + module.out_features)
            for path, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and any(path.endswith("." + name) for name in names)
        )

    total = count(unet, bench_lora.DIFFUSERS_UNET_LAYERS)
    return total + (count(text_encoder, bench_lora.DIFFUSERS_TEXT_LAYERS) if text_encoder is not None else 0)


def _network_parameters(components, spec):
    from dreambooth.network import adapter
    from dreambooth.settings import Settings

    settings = Settings(**bench_lora.lora_settings(spec))
    with bench_lora.lora_targets(spec):
        network = adapter.build_network(components, settings)
    groups = network.param_groups(1e-4, 1e-4)
    return sum(p.numel() for group in groups for p in group["params"]), network


@pytest.mark.parametrize("train_text", [False, True], ids=["text-frozen", "text-trained"])
@pytest.mark.parametrize("scale", ["tiny64", "small128"])
def test_diffusers_targets_adapt_exactly_the_scripts_layers(scale, train_text):
    from dreambooth.models.tiny import tiny_components
    from dreambooth.network import adapter

    components = tiny_components(bench.bench_architecture(bench.SCALES[scale][0]), seed=0)
    choose = adapter.select_targets
    spec = _spec(scale=scale, train_text=train_text, rank=4)
    ours, network = _network_parameters(components, {**spec, "targets": "diffusers"})
    assert adapter.select_targets is choose  # the narrowing is put back
    expected = _script_parameters(components.unet, components.text_encoder if train_text else None, 4)
    assert ours == expected
    assert all(bench_lora.is_diffusers_target(target) for target in network.targets.values())
    assert any(target.is_text for target in network.targets.values()) == train_text
    kohya, _ = _network_parameters(components, spec)  # proj_in/out and the feed-forward layers on top
    assert kohya > ours


def test_lora_settings_match_what_the_script_is_given():
    from dreambooth.settings import Settings

    settings = Settings(**bench_lora.lora_settings(_spec(rank=8, learning_rate=3e-4, train_text=True)))
    assert settings.training_method == "lora" and settings.network_rank == 8 and settings.network_alpha == 8.0
    assert settings.network_unet_lr == settings.network_text_encoder_lr == 3e-4  # the script has one rate
    assert settings.network_dropout == 0 and settings.network_conv_rank == 0  # neither exists in the script
    assert settings.network_train_text_encoder and not settings.train_text_encoder
    assert bench_lora.lora_settings({**_spec(), "method": "full"}) == {}


@pytest.mark.slow  # two short trainer runs (tiny64, 2 steps each) with their tracked passes
def test_lora_rows_train_the_adapter_only_and_report_their_memory(tmp_path, monkeypatch):
    from dreambooth.models.tiny import tiny_components

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    components = tiny_components(bench.bench_architecture("bench-tiny"), seed=0)
    expected = _script_parameters(components.unet, None, 4)
    for mode in bench_lora.LORA_MODES:
        row = bench.measure_one(_spec(mode=mode, targets="diffusers"))
        assert row["method"] == "lora" and row["rank"] == 4 and row["targets"] == "diffusers"
        assert row["trained_parameters"] == expected  # the optimizer steps the adapters, not the UNet
        assert row["seconds_per_step"] > 0
        assert row["estimate_mib"] == pytest.approx(row["tracked_mib"], rel=0.03)
