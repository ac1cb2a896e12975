"""LoRA / LoHa / LoKr training (dreambooth/network, train/method.py): the adapter's math against the WebUI's, the
base model left exactly as it was, the file the WebUI and diffusers read, and the run's features with an adapter.

Tiny models of the real SD UNet's shape (``layout="sd"``): the WebUI's Lora loader maps layer names by that shape.
"""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch

from dreambooth.models.tiny import tiny_architecture, tiny_components
from dreambooth.network.adapter import build_network
from dreambooth.network.names import all_layers

LORA = {"training_method": "lora"}


def adapter_settings(algorithm="lora", rank=4, alpha=2.0, conv_rank=0, conv_alpha=0.0, text=True, dropout=0.0):
    return types.SimpleNamespace(
        training_method=algorithm,
        network_rank=rank,
        network_alpha=alpha,
        network_conv_rank=conv_rank,
        network_conv_alpha=conv_alpha,
        network_train_text_encoder=text,
        network_dropout=dropout,
        seed=7,
    )


def sd_shaped(family="sd1"):
    return tiny_components(tiny_architecture(family, layout="sd"))


def randomize(network, seed=0):
    """Non-zero adapter weights (a new adapter adds nothing: its last factor starts at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


def layer_input(layer, generator):
    if isinstance(layer, torch.nn.Conv2d):
        return torch.randn((2, layer.in_channels, 8, 8), generator=generator)
    return torch.randn((2, 5, layer.in_features), generator=generator)


def run_layer(layer, x, weight=None):
    """The layer's output, or (``weight`` given) the output of that weight alone without bias."""
    if weight is None:
        return layer(x)
    if isinstance(layer, torch.nn.Conv2d):
        return torch.nn.functional.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    return torch.nn.functional.linear(x, weight)


# ------------------------------------------------------------------------------------------------- the math


def webui_delta(tensors: dict, weight: torch.Tensor) -> torch.Tensor:
    """The weight delta the WebUI v1.10.1 Lora extension adds for one layer of a file (multiplier 1), written from
    its rules (lora_facts §1.4: network_lora / network_hada / network_lokr, ``calc_scale``): LoRA up @ down, LoHa
    (w1a @ w1b) * (w2a @ w2b), LoKr kron(w1, w2); scale alpha / dim, where dim is the rank (LoKr: of a decomposed
    factor; both factors full: no dim, scale 1)."""
    shape = weight.shape
    if "lora_down.weight" in tensors:
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        updown = (up.flatten(1) @ down.flatten(1)).reshape(shape)
        dim = down.shape[0]
    elif "hada_w1_a" in tensors:
        t = tensors
        updown = ((t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])).reshape(shape)
        dim = t["hada_w1_b"].shape[0]
    else:
        t = tensors
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2).reshape(shape)
        dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    alpha = float(tensors["alpha"]) if "alpha" in tensors else None
    scale = alpha / dim if alpha is not None and dim else 1.0
    return updown * scale


@pytest.mark.parametrize(
    ("algorithm", "rank"),
    [("lora", 4), ("loha", 4), ("lokr", 4)],
)
def test_the_trained_delta_is_the_one_the_webui_applies_from_the_file(algorithm, rank):
    """For every adapted layer (attention, feed-forward, resnet 3x3 convs, text encoder): what the adapter adds in
    training equals what the WebUI computes from the file's tensors, alpha / rank included (LoKr with both factors
    full: alpha = rank is stored, scale 1)."""
    c = sd_shaped()
    network = build_network(c, adapter_settings(algorithm, rank=rank, alpha=1.0, conv_rank=rank, conv_alpha=3.0))
    randomize(network)
    tensors = network.kohya_tensors()
    network.eval()
    generator = torch.Generator().manual_seed(1)
    kinds = set()
    for name, target in network.targets.items():
        layer = target.module
        x = layer_input(layer, generator)
        with torch.no_grad():
            base = run_layer(layer, x)
            network.apply()
            adapted = run_layer(layer, x)
            network.restore()
            prefix = name + "."
            own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            expected = run_layer(layer, x, webui_delta(own, layer.weight))
        torch.testing.assert_close(adapted - base, expected, atol=2e-5, rtol=1e-4, msg=name)
        kinds.add((type(layer).__name__, "lokr_w2_a" in own))
    assert {"Linear", "Conv2d"} <= {kind for kind, _ in kinds}
    if algorithm == "lokr":
        # both LoKr conventions: factors too small to decompose (full w2: alpha = rank stored, scale 1) and w2
        # decomposed at the rank (scale alpha / rank)
        assert {decomposed for _, decomposed in kinds} == {True, False}


@pytest.mark.parametrize("algorithm", ["lora", "loha"])
def test_alpha_scales_the_delta_in_proportion_to_alpha_over_rank(algorithm):
    """The same adapter weights with alpha 2 and alpha 8 (rank 4): the second adds exactly 4x the delta."""
    c = sd_shaped()
    small = build_network(c, adapter_settings(algorithm, rank=4, alpha=2.0))
    large = build_network(c, adapter_settings(algorithm, rank=4, alpha=8.0))
    randomize(small)
    randomize(large)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    layer = small.targets[name].module
    x = torch.randn((1, 77, layer.in_features))
    deltas = []
    with torch.no_grad():
        base = layer(x)
        for network in (small, large):
            network.eval()
            network.apply()
            deltas.append(layer(x) - base)
            network.restore()
    assert float(small.kohya_tensors()[name + ".alpha"]) == 2.0 and float(large.kohya_tensors()[name + ".alpha"]) == 8
    assert deltas[0].abs().max() > 1e-3
    torch.testing.assert_close(deltas[1], deltas[0] * 4, rtol=1e-5, atol=1e-6)


def test_apply_and_restore_leave_every_layer_exactly_as_it_was():
    c = sd_shaped()
    network = build_network(c, adapter_settings("lora", conv_rank=4))
    randomize(network)
    patched_by_someone = network.targets["lora_unet_mid_block_attentions_0_proj_in"].module
    own_forward = patched_by_someone.forward  # an instance forward set before us (another extension's)
    patched_by_someone.forward = own_forward
    weights = {k: v.clone() for k, v in c.unet.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    latents, hidden = torch.randn((1, 4, 8, 8), generator=generator), torch.randn((1, 77, 32), generator=generator)
    with torch.no_grad():
        before = c.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden).sample
        network.apply()
        network.apply()  # twice: still one adapter per layer
        adapted = c.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden).sample
        network.restore()
        network.restore()
        after = c.unet(latents, torch.tensor([10]), encoder_hidden_states=hidden).sample
    assert not torch.allclose(adapted, before)
    assert torch.equal(after, before)
    assert all(torch.equal(v, weights[k]) for k, v in c.unet.state_dict().items())
    for name, target in network.targets.items():
        left = {k for k in vars(target.module) if k == "forward" or k.startswith("_lycoris")}
        assert left == ({"forward"} if target.module is patched_by_someone else set()), name
    assert patched_by_someone.forward == own_forward


# ------------------------------------------------------------------------------------------------- runs


@pytest.fixture
def lora_settings(make_settings, tiny_checkpoint):
    def make(family="sd1", **changes):
        model = tiny_checkpoint("sd1-sd" if family == "sd1" else "sd2-v-sd")
        return make_settings(pretrained_model_name_or_path=str(model), **{**LORA, **changes})

    return make


def train(settings, **kwargs):
    from dreambooth.train.loop import Trainer

    trainer = Trainer(settings, **kwargs)
    return trainer, trainer.run()


def unet_output(components, network=None):
    unet = components.unet
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn((1, 4, 8, 8), generator=generator).to(unet.dtype)
    hidden = torch.randn((1, 77, unet.config.cross_attention_dim), generator=generator).to(unet.dtype)
    if network is not None:
        network.eval()
        network.apply()
    try:
        with torch.no_grad():
            return unet.eval()(latents, torch.tensor([400]), encoder_hidden_states=hidden).sample.float()
    finally:
        if network is not None:
            network.restore()


@pytest.mark.slow
@pytest.mark.parametrize(("family", "v2", "version"), [("sd1", "False", "sd_v1"), ("sd2", "True", "sd_v2_v")])
def test_the_file_names_real_layers_with_their_shapes_and_says_its_model_version(lora_settings, family, v2, version):
    """Every key names a layer of the model (kohya's names, lora_te_text_model_... whatever the transformers
    version) with the layer's shapes; ss_v2 is what the WebUI uses to show an SD 2 LoRA's card; SD 2.x v-prediction
    trains (its loss is the velocity's)."""
    from dreambooth.network.files import read_network_file

    settings = lora_settings(
        family, network_rank=4, network_alpha=2.0, network_conv_rank=2, network_train_text_encoder=True
    )
    trainer, result = train(settings)
    file = read_network_file(result.checkpoints[-1])
    assert result.checkpoints[-1].name == "dreambooth_2.safetensors" and file.algorithm == "lora"
    c = trainer.components
    layers = all_layers(c.unet, c.text_encoder)
    assert file.layers <= set(layers)
    assert any(n.startswith("lora_te_text_model_encoder_layers_") for n in file.layers)
    assert "lora_unet_down_blocks_0_resnets_1_conv1" in file.layers
    for name in file.layers:
        weight = layers[name].module.weight
        down, up = file.tensors[f"{name}.lora_down.weight"], file.tensors[f"{name}.lora_up.weight"]
        rank = 2 if layers[name].conv else 4
        kernel = (1, 1) if weight.dim() == 4 else ()
        assert down.shape == (rank, *weight.shape[1:]) and up.shape == (weight.shape[0], rank, *kernel), name
        assert file.tensors[f"{name}.alpha"].shape == () and file.alpha(name) == 2.0  # conv alpha 0: the conv rank
    meta = file.metadata
    assert meta["ss_v2"] == v2 and meta["ss_base_model_version"] == version
    assert meta["ss_network_module"] == "lycoris.kohya" and (meta["ss_network_dim"], meta["ss_network_alpha"]) == (
        "4",
        "2",
    )
    assert meta["ss_steps"] == "2" and meta["dreambooth.step"] == "2" and meta["ss_num_train_images"] == "3"
    assert meta["ss_sd_model_name"] == settings.pretrained_model_name_or_path.rsplit("/", 1)[-1]
    assert meta["dreambooth.base_model"] == settings.pretrained_model_name_or_path
    assert meta["ss_tag_frequency"] == '{"instance": {"photo of zwx ring": 3}}'
    assert len(meta["ss_new_sd_model_hash"]) == 64 and meta["sshs_model_hash"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "suffixes"),
    [
        ("loha", {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}),
        ("lokr", {"lokr_w1", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "alpha"}),  # w2 full where too small to factor
    ],
)
def test_loha_and_lokr_write_their_own_key_families(lora_settings, algorithm, suffixes):
    from dreambooth.network.files import read_network_file

    _, result = train(lora_settings(training_method=algorithm, network_rank=4))
    file = read_network_file(result.checkpoints[-1])
    assert file.algorithm == algorithm
    assert {key.split(".", 1)[1] for key in file.tensors} == suffixes
    assert file.metadata["ss_network_args"].startswith(f'{{"algo": "{algorithm}"')


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "no"])
def test_the_given_model_comes_back_untouched_after_a_run_and_after_a_failed_run(lora_settings, monkeypatch, precision):
    """The WebUI's model is trained in place: in its own half precision (no copy), with the adapter patched into its
    layers (mixed precision off: upcast to fp32 in place); afterwards every weight, dtype and forward is what it was
    -- also when a step fails."""
    from dreambooth.models.components import load_components
    from dreambooth.train.failures import TrainingFailed
    from dreambooth.train.loop import Trainer

    settings = lora_settings(
        mixed_precision=precision, network_train_text_encoder=True, max_train_steps=3, gradient_checkpointing=True
    )
    components = load_components(settings.pretrained_model_name_or_path)
    for module in (components.unet, components.text_encoder, components.vae):
        module.to(torch.bfloat16)  # as a WebUI holds it (half precision)
    given = {name: getattr(components, name) for name in ("unet", "text_encoder", "vae")}
    weights = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in given.items()}
    before = unet_output(components)

    def check() -> None:
        for name, module in given.items():
            assert getattr(components, name) is module  # the very modules, not copies
            state = module.state_dict()
            assert all(v.dtype == weights[name][k].dtype and torch.equal(v, weights[name][k]) for k, v in state.items())
            assert not any("forward" in vars(m) or "_lycoris_wrappers" in vars(m) for m in module.modules()), name
        assert torch.equal(unet_output(components), before)
        assert not given["unet"].is_gradient_checkpointing  # the run's choice, not left on the given model

    from dreambooth.events import Callbacks

    in_steps = []

    class Watch(Callbacks):  # during the steps: the given UNet itself runs, patched, not a copy
        def on_progress(self, progress):
            if progress.phase == "training":
                unet = trainer.components.unet
                in_steps.append(unet is given["unet"] and any("forward" in vars(m) for m in unet.modules()))

    trainer = Trainer(settings, callbacks=Watch(), components=components)
    result = trainer.run()
    assert result.step == 3 and in_steps == [True] * 3 and not trainer.method.network.is_applied
    check()
    calls = []
    original = Trainer._loss

    def failing(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("a step failed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_loss", failing)
    with pytest.raises(TrainingFailed, match="a step failed"):
        Trainer(dataclasses.replace(settings, output_dir=settings.output_dir + "-2"), components=components).run()
    check()


@pytest.mark.slow
def test_cancel_and_exact_resume_with_an_adapter(lora_settings):
    """Cancelled at step 2 of 4 (a LoRA file and a resumable state are kept) and resumed: the same adapter, bit for
    bit, as 4 steps at once -- dropout and the text encoder's adapters included (the state holds the adapter, the
    optimizer, the schedule and the RNG)."""
    from dreambooth.events import Callbacks, Commands
    from dreambooth.network.files import read_network_file

    common = {
        "network_dropout": 0.3,
        "network_train_text_encoder": True,
        "lr_scheduler": "linear",
        "max_train_steps": 4,
    }
    straight = lora_settings(**common)
    _, whole = train(straight)

    class CancelAtTwo(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == 2:
                commands.cancel()

    commands = Commands()
    split = lora_settings(output_dir=straight.output_dir + "-split", **common)
    _, part = train(split, callbacks=CancelAtTwo(), commands=commands)
    assert part.cancelled and part.step == 2 and part.checkpoints[-1].name == "dreambooth_2.safetensors"
    _, rest = train(dataclasses.replace(split, resume_from=str(part.state_dir)))
    assert rest.step == 4
    a, b = read_network_file(whole.checkpoints[-1]).tensors, read_network_file(rest.checkpoints[-1]).tensors
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    halfway = read_network_file(part.checkpoints[-1]).tensors
    assert not all(torch.equal(a[k], halfway[k]) for k in a)


def test_network_init_from_continues_from_the_file_and_refuses_one_that_does_not_match(lora_settings):
    from dreambooth.errors import DreamBoothError
    from dreambooth.network.files import read_network_file
    from dreambooth.train.failures import TrainingFailed
    from dreambooth.train.loop import Trainer

    _, first = train(lora_settings(max_train_steps=1))
    start = first.checkpoints[-1]
    settings = lora_settings(max_train_steps=1, network_init_from=str(start))
    settings = dataclasses.replace(settings, output_dir=settings.output_dir + "-b")

    class Peek(Trainer):
        def _steps(self, run):  # the adapter as the steps find it
            self.seen = self.method.network.kohya_tensors()
            raise RuntimeError("seen")

    peek = Peek(settings)
    with pytest.raises(TrainingFailed, match="seen"):
        peek.run()
    saved = read_network_file(start).tensors
    assert all(torch.equal(peek.seen[k], saved[k]) for k in saved)
    expected = (
        r"network_init_from: .*dreambooth_1.safetensors does not match these settings: "
        r"lora_unet_down_blocks_0_attentions_0_proj_in\.lora_down\.weight has the shape \[16, 32, 1, 1\], these "
        r"settings make \[8, 32, 1, 1\] \(another network_rank or network_conv_rank\?\)\.$"
    )
    with pytest.raises(DreamBoothError, match=expected):
        train(dataclasses.replace(settings, network_rank=8))
    with pytest.raises(DreamBoothError, match=r"it has no adapter for the layer lora_te_text_model_encoder"):
        train(dataclasses.replace(settings, network_train_text_encoder=True))


def peft_backend() -> bool:
    from diffusers.utils import USE_PEFT_BACKEND

    return bool(USE_PEFT_BACKEND)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_diffusers_load_lora_weights_reads_our_file_as_we_trained_it(lora_settings, family):
    """The independent reader: diffusers' ``load_lora_weights`` (it reads kohya LoRA files; not LoHa / LoKr) on a
    pipeline of the base model gives the UNet and text-encoder outputs of our trained model with its adapter."""
    if not peft_backend():
        pytest.skip(
            "diffusers' load_lora_weights needs its PEFT backend, which needs transformers >= 4.34 (this is the "
            "WebUI's transformers 4.30.2 environment); the latest environment runs this test"
        )
    from diffusers import StableDiffusionPipeline

    from dreambooth.models.components import load_components

    settings = lora_settings(
        family,
        network_rank=4,
        network_alpha=2.0,
        network_conv_rank=2,
        network_train_text_encoder=True,
        network_unet_lr=1e-2,
        network_text_encoder_lr=1e-2,
    )
    trainer, result = train(settings)
    base = load_components(settings.pretrained_model_name_or_path)  # the base model, apart from the trained one
    pipe = StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=base.noise_scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    before = unet_output(base)
    pipe.load_lora_weights(str(result.checkpoints[-1]))
    ours = trainer.components
    network = trainer.method.network
    expected = unet_output(ours, network)
    assert (expected - before).abs().max() > 1e-2  # the adapter changes the output well beyond the tolerance
    torch.testing.assert_close(unet_output(base), expected, rtol=1e-4, atol=1e-5)
    ids = ours.tokenizer(["photo of zwx ring"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    network.eval()
    network.apply()
    try:
        with torch.no_grad():
            text_expected = ours.text_encoder(ids)[0]
    finally:
        network.restore()
    with torch.no_grad():
        assert (text_expected - ours.text_encoder(ids)[0]).abs().max() > 1e-3
        torch.testing.assert_close(pipe.text_encoder(ids)[0], text_expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_lora_run_keeps_every_feature(lora_settings, tmp_path):
    """Prior preservation with class images made by the base model *without* the adapter (even one started from a
    trained file), two concepts with captions, aspect-ratio buckets, augmentation, saves every step with retention,
    samples made with the adapter (they differ from the base model's), sample now and save now."""
    from conftest import draw_subject
    from PIL import Image

    from dreambooth.events import Callbacks, Commands
    from dreambooth.network.files import read_network_file
    from dreambooth.settings import Concept

    def pixels(folder):
        return [Image.open(p).tobytes() for p in sorted(folder.glob("*.png"))]

    _, trained = train(lora_settings(max_train_steps=2, network_unet_lr=1e-2, output_dir=str(tmp_path / "first")))
    concepts = []
    for index, size in enumerate(((128, 64), (64, 128))):
        folder = tmp_path / f"concept{index}"
        draw_subject(folder, count=2, size=size, seed=index, captions=["red ring, grass", "red ring, sand"])
        concepts.append(
            Concept(
                instance_data_dir=str(folder),
                instance_prompt=f"photo of zwx{index} ring",
                class_data_dir=str(tmp_path / f"class{index}"),
                class_prompt="photo of a ring",
            )
        )
    common = {
        "with_prior_preservation": True,
        "use_txt_as_label": True,
        "caption_template": "[PX], [P]",
        "use_aspect_ratio_bucket": True,
        "augment_rotation": 10.0,
        "augment_probability": 1.0,
        "n_save_sample": 1,
    }
    # The base model's class images and samples: a full run that learns nothing (learning rate 0) makes them.
    base_settings = lora_settings(
        training_method="full", max_train_steps=1, learning_rate=0.0, output_dir=str(tmp_path / "base"), **common
    )
    base_settings.concepts = [dataclasses.replace(c, class_data_dir=c.class_data_dir + "-base") for c in concepts]
    train(base_settings)

    commands = Commands()

    class Ask(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training" and progress.step == 1:
                commands.request("sample")
                commands.request("save")

    settings = lora_settings(
        max_train_steps=3,
        network_init_from=str(trained.checkpoints[-1]),
        save_model_every_n_steps=2,
        save_total_limit=1,
        **common,
    )
    settings.concepts = concepts
    trainer, result = train(settings, callbacks=Ask(), commands=commands)
    for index in range(2):
        made, base = pixels(tmp_path / f"class{index}"), pixels(tmp_path / f"class{index}-base")
        assert len(made) == 2 and made == base  # the base model's images, not the adapted one's
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["dreambooth_3.safetensors"]  # retention: newest
    assert sorted(d.name for d in (out / "samples").iterdir()) == ["step_000001", "step_000002", "step_000003"]
    assert pixels(out / "samples" / "step_000001") != pixels(tmp_path / "base" / "samples" / "step_000001")
    file = read_network_file(result.checkpoints[-1])
    frequency = json.loads(file.metadata["ss_tag_frequency"])
    assert frequency == {
        "concept0": {"photo of zwx0 ring": 2, "red ring": 2, "grass": 1, "sand": 1},
        "concept1": {"photo of zwx1 ring": 2, "red ring": 2, "grass": 1, "sand": 1},
    }
    assert file.metadata["ss_num_reg_images"] == "4" and file.metadata["ss_enable_bucket"] == "True"
    assert not trainer.method.network.is_applied


def test_impossible_combinations_are_refused_with_what_to_do(make_settings, tmp_path):
    problems = make_settings(**LORA, train_text_encoder=True, save_format="ckpt", model_name="a=b").validate()
    assert any(
        p.startswith("train_text_encoder trains every weight") and "network_train_text_encoder" in p for p in problems
    )
    assert any("writes .safetensors LoRA files only" in p for p in problems)
    assert any("may not contain '='" in p for p in problems)
    missing = str(tmp_path / "none.safetensors")
    assert any(p.startswith("network_init_from:") for p in make_settings(**LORA, network_init_from=missing).validate())
    assert make_settings(network_rank=4, network_train_text_encoder=True).validate() == []  # unused with full: fine
    assert any("at least 1" in p for p in make_settings(**LORA, network_rank=0).validate())
