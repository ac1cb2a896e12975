"""Every settings field changes what the trainer does: one row per field, each with an observable difference.

A row runs a short tiny training with the field changed (``changes``), and usually a reference run with
``base`` settings, and compares something a user would see: the trained weights, the learning rates, the files
written, the images made.  Fields whose effect exists only on a GPU are checked for the call they make.
``test_every_field_has_a_row`` keeps the table complete: a new field without a row fails the suite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import draw_subject

from dreambooth.errors import DreamBoothError
from dreambooth.events import Callbacks
from dreambooth.settings import Concept, Settings, SettingsError
from dreambooth.train.loop import Trainer


def digest(tensors: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode())
        h.update(tensors[key].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class Run:
    trainer: Trainer
    result: object
    out: Path
    lrs: list
    losses: list
    validation: list

    @property
    def unet(self) -> str:
        return digest(self.trainer.components.unet.state_dict())

    @property
    def text(self) -> str:
        return digest(self.trainer.components.text_encoder.state_dict())

    @property
    def lora(self):
        """The LoRA file the run wrote last (dreambooth/network/files.py)."""
        from dreambooth.network.files import read_network_file

        return read_network_file(self.result.checkpoints[-1])

    @property
    def adapter(self) -> str:
        return digest(self.lora.tensors)

    @property
    def adapted(self):
        """The UNet's output with the trained adapter applied, on a fixed input (the adapter is taken off again)."""
        network = self.trainer.method.network
        unet = self.trainer.components.unet
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn((1, 4, 8, 8), generator=generator)
        hidden = torch.randn((1, 77, unet.config.cross_attention_dim), generator=generator)
        network.apply()
        try:
            with torch.no_grad():
                return unet.eval()(latents, torch.tensor([500]), encoder_hidden_states=hidden).sample
        finally:
            network.restore()

    def images(self, folder: str) -> list[bytes]:
        import numpy as np
        from PIL import Image

        return [np.asarray(Image.open(p)).tobytes() for p in sorted((self.out / folder).rglob("*.png"))]


class Recorder(Callbacks):
    def __init__(self):
        self.lrs = []
        self.losses = []  # (total, instance, prior) of each step
        self.validation = []  # (step, validation loss)

    def on_progress(self, progress):
        if progress.phase == "validation":
            self.validation.append((progress.step, progress.validation_loss))
        if progress.phase == "training":
            self.lrs.append(dict(progress.learning_rates))
            self.losses.append((progress.loss, progress.instance_loss, progress.prior_loss))


@pytest.fixture
def train(make_settings, tmp_path):
    counter = iter(range(1000))

    def run(concept=None, **changes) -> Run:
        out = tmp_path / f"run{next(counter)}"
        changes.setdefault("output_dir", str(out))
        settings = make_settings(concept=concept, **changes)
        recorder = Recorder()
        trainer = Trainer(settings, callbacks=recorder)
        result = trainer.run()
        return Run(trainer, result, Path(settings.output_dir), recorder.lrs, recorder.losses, recorder.validation)

    return run


PRIOR = {"with_prior_preservation": True}
EMA = {"use_ema": True}
SAMPLES = {"n_save_sample": 1}
TESTS = {"test_prompt": "photo of zwx ring on a table"}
TEXT = {"train_text_encoder": True}
LORA = {"training_method": "lora"}
LORA_TE = {**LORA, "network_train_text_encoder": True}
LOCON = {**LORA, "network_conv_rank": 4}


def differs(attribute):
    def check(base: Run, variant: Run) -> None:
        a, b = getattr(base, attribute), getattr(variant, attribute)
        assert a != b, f"{attribute} did not change"

    return check


def images_differ(folder):
    def check(base: Run, variant: Run) -> None:
        a, b = base.images(folder), variant.images(folder)
        assert a and b and a != b

    return check


def count(folder, expected):
    def check(base: Run, variant: Run) -> None:
        assert len(variant.images(folder)) == expected

    return check


def outputs_differ(base: Run, variant: Run) -> None:
    assert not torch.allclose(base.adapted, variant.adapted)


def untrained_unet(run: Run) -> str:
    """The digest of the base model's UNet as the file holds it."""
    from dreambooth.models.components import load_components

    return digest(load_components(run.trainer.settings.pretrained_model_name_or_path).unet.state_dict())


def ranks(run: Run) -> set[int]:
    return {v.shape[0] for k, v in run.lora.tensors.items() if k.endswith("lora_down.weight")}


def layers(run: Run, prefix: str) -> set[str]:
    return {name for name in run.lora.layers if name.startswith(prefix)}


def saved_unet(run: Run, name: str = "dreambooth_2") -> str:
    """The digest of the UNet in the run's checkpoint ``name``."""
    from dreambooth.models.components import load_components

    return digest(load_components(run.out / f"{name}.safetensors").unet.state_dict())


def bf16_values(module) -> bool:
    """Every weight of ``module`` is a bf16 value (trained with full_bf16; saved and kept as fp32 after the run)."""
    return all(torch.equal(v, v.bfloat16().float()) for v in module.state_dict().values())


# field -> (base changes, variant changes, check); "concept." rows change the concept.
ROWS = {
    "pretrained_vae_name_or_path": None,  # its own test below
    "pretrained_model_name_or_path": None,
    # aspect-ratio buckets need images of several shapes: tests/test_buckets.py shows each field's effect
    "use_aspect_ratio_bucket": None,
    "aspect_buckets": None,
    "bucket_min_side": None,
    "bucket_max_side": None,
    "debug_arb": None,
    # only inpainting models draw masks: tests/test_inpainting.py shows the share of full masks and the UNet input
    "inpainting_full_mask_ratio": None,
    "augment_rotation": ({}, {"augment_rotation": 20.0, "augment_probability": 1.0}, differs("unet")),
    "augment_brightness": ({}, {"augment_brightness": 0.5, "augment_probability": 1.0}, differs("unet")),
    "augment_contrast": ({}, {"augment_contrast": 0.5, "augment_probability": 1.0}, differs("unet")),
    "augment_random_crop": ({}, {"augment_random_crop": 0.4, "augment_probability": 1.0}, differs("unet")),
    "augment_probability": (
        {"augment_rotation": 20.0, "augment_probability": 0.0},
        {"augment_rotation": 20.0, "augment_probability": 1.0},
        differs("unet"),
    ),
    "augment_variants": (
        {"augment_rotation": 20.0, "augment_probability": 1.0, "augment_variants": 1, "max_train_steps": 4},
        {"augment_rotation": 20.0, "augment_probability": 1.0, "augment_variants": 3, "max_train_steps": 4},
        differs("unet"),
    ),
    "output_dir": ({}, {}, lambda b, v: (v.out / "dreambooth_2.safetensors").is_file()),
    "model_name": ({}, {"model_name": "zwx"}, lambda b, v: (v.out / "zwx_2.safetensors").is_file()),
    "checkpoint_dir": (
        {},
        {"checkpoint_dir": "models"},
        lambda b, v: (
            (v.out / "models" / "dreambooth_2.safetensors").is_file()
            and not (v.out / "dreambooth_2.safetensors").exists()
        ),
    ),
    "save_format": ({}, {"save_format": "ckpt"}, lambda b, v: (v.out / "dreambooth_2.ckpt").is_file()),
    "save_half": None,
    "resume_from": None,
    "concepts": ({}, {"concept": {"instance_prompt": "photo of qlx ring"}}, differs("unet")),
    "resolution": ({}, {"resolution": 128}, differs("unet")),
    "center_crop": None,  # test_center_crop_encodes_the_middle_of_each_image
    "hflip": ({}, {"hflip": True}, differs("unet")),
    "use_txt_as_label": ({}, {"use_txt_as_label": True}, differs("unet")),
    "use_filename_as_label": ({}, {"use_filename_as_label": True}, differs("unet")),
    "caption_template": (
        {"use_txt_as_label": True},
        {"use_txt_as_label": True, "caption_template": "[P] by [PX]"},
        differs("unet"),
    ),
    "with_prior_preservation": ({}, PRIOR, differs("unet")),
    "prior_loss_weight": None,  # test_prior_loss_weight_scales_the_prior_term
    # the base model's prediction as the prior, no class image written: tests/test_prior_from_base.py (the drift of
    # class predictions, the adapter really off, the weighted term, the half-precision copy, its memory)
    "prior_from_base_model": (
        {},
        {"prior_from_base_model": True},
        lambda b, v: (
            b.losses[1][2] is None and v.losses[1][2] > 0 and b.unet != v.unet and not (v.out.parent / "class").exists()
        ),
    ),
    # the EMA's closed form with the warm-up, update_every, exact resume, LoRA's adapter: tests/test_ema.py
    "use_ema": ({}, EMA, lambda b, v: saved_unet(b) == b.unet and saved_unet(v) != v.unet),
    "ema_decay": None,  # test_the_ema_equals_the_closed_form_after_k_steps_with_update_every, test_the_saved_...
    "ema_update_every": None,  # the same tests: updates after every N-th step only
    "ema_on_cpu": None,  # test_the_memory_estimate_counts_the_ema_on_the_gpu_only (on a CPU both are the CPU)
    "ema_output": (
        EMA,
        {**EMA, "ema_output": "both"},
        lambda b, v: (
            saved_unet(v, "dreambooth_2_trained") == v.unet
            and saved_unet(v) == saved_unet(b) != v.unet
            and not (b.out / "dreambooth_2_trained.safetensors").exists()
        ),
    ),
    "num_class_images": ({}, {**PRIOR, "num_class_images": 3}, count("../class", 3)),
    "sample_batch_size": None,
    "class_inference_steps": (PRIOR, {**PRIOR, "class_inference_steps": 3}, None),
    "seed": ({}, {"seed": 99}, differs("unet")),
    "train_batch_size": ({}, {"train_batch_size": 2}, differs("unet")),
    "num_train_epochs": (
        {"max_train_steps": None, "num_train_epochs": 1},
        {"max_train_steps": None, "num_train_epochs": 2},
        lambda b, v: (b.result.total_steps, v.result.total_steps) == (3, 6),
    ),
    "max_train_steps": ({}, {"max_train_steps": 3}, lambda b, v: v.result.step == 3 and len(v.lrs) == 3),
    "gradient_accumulation_steps": ({}, {"gradient_accumulation_steps": 2}, differs("unet")),
    "learning_rate": None,  # test_learning_rate_scales_the_first_update
    "scale_lr": (
        {"train_batch_size": 2},
        {"train_batch_size": 2, "scale_lr": True},
        lambda b, v: v.lrs[0]["group0"] == 2 * b.lrs[0]["group0"],
    ),
    "lr_scheduler": ({"max_train_steps": 3}, {"max_train_steps": 3, "lr_scheduler": "linear"}, differs("lrs")),
    "lr_warmup_steps": (
        {"lr_scheduler": "constant_with_warmup"},
        {"lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 2},
        differs("lrs"),
    ),
    "lr_cycles": (
        {"lr_scheduler": "cosine_with_restarts", "max_train_steps": 4},
        {"lr_scheduler": "cosine_with_restarts", "max_train_steps": 4, "lr_cycles": 2},
        differs("lrs"),
    ),
    "lr_power": (
        {"lr_scheduler": "polynomial", "max_train_steps": 3},
        {"lr_scheduler": "polynomial", "max_train_steps": 3, "lr_power": 2.0},
        differs("lrs"),
    ),
    # each optimizer trains, resumes exactly and is refused with a sentence without its package:
    # tests/test_optimizers.py; the Prodigy fields reach Prodigy (test_each_optimizer_is_its_librarys_with_...)
    "optimizer": None,
    "prodigy_d_coef": None,
    "prodigy_use_bias_correction": None,
    "prodigy_safeguard_warmup": None,
    # the loss terms against hand-computed values and their effect in a run: tests/test_loss_options.py
    "loss_type": None,  # test_huber_and_smooth_l1_losses_by_hand, test_min_snr_and_huber_weigh_the_reported_loss
    "huber_c": None,  # test_huber_and_smooth_l1_losses_by_hand, test_huber_c_schedules_by_hand
    "huber_schedule": None,  # test_huber_c_schedules_by_hand
    "min_snr_gamma": None,  # test_min_snr_weights_epsilon_and_v_prediction, test_min_snr_and_huber_weigh_the_...
    "debiased_estimation": None,  # test_debiased_weights_cap_..., test_min_snr_and_huber_weigh_the_reported_loss
    "noise_offset": None,  # test_noise_offset_and_input_perturbation_change_the_input_as_stated
    "noise_offset_random_strength": None,  # the same test: one U(0, 1) factor per image
    "input_perturbation": None,  # the same test, and test_input_perturbation_keeps_the_target
    "zero_terminal_snr": None,  # test_zero_terminal_snr_*: the last alpha-bar 0, trailing samples, the warning
    "min_timestep": None,  # test_timesteps_are_drawn_in_the_range
    "max_timestep": None,  # test_timesteps_are_drawn_in_the_range
    # masked loss: tests/test_masked_loss.py (the term by hand; pixels under black change neither the loss nor the
    # gradients, bit for bit; all-white masks train exactly as none; masks follow every crop, bucket and flip)
    "masked_loss": None,  # test_a_run_with_white_masks_trains_exactly_as_without_and_black_changes_it, ...
    "masked_loss_unmasked_weight": None,  # test_the_unmasked_weight_setting_reaches_the_trainers_weights
    "adam_beta1": ({"max_train_steps": 3}, {"max_train_steps": 3, "adam_beta1": 0.5}, differs("unet")),
    "adam_beta2": ({"max_train_steps": 3}, {"max_train_steps": 3, "adam_beta2": 0.9}, differs("unet")),
    "adam_weight_decay": ({}, {"adam_weight_decay": 0.5}, differs("unet")),
    "adam_epsilon": ({}, {"adam_epsilon": 1e-2}, differs("unet")),
    "max_grad_norm": None,  # test_max_grad_norm_bounds_the_gradient_the_optimizer_sees
    "mixed_precision": None,  # test_mixed_precision_runs_the_unet_in_that_dtype
    "gradient_checkpointing": (
        {},
        {"gradient_checkpointing": True},
        lambda b, v: (
            v.trainer.components.unet.is_gradient_checkpointing
            and not b.trainer.components.unet.is_gradient_checkpointing
        ),
    ),
    "cache_latents": None,
    "attention": None,
    "low_memory": None,  # test_low_memory_without_a_gpu_size_turns_every_memory_switch_on
    "gpu_memory_gb": None,  # test_low_memory_applies_the_fit_preset_chosen_for_gpu_memory_gb
    # the same weights as without it, in less memory: tests/test_paramwise.py shows each effect (the update in the
    # backward pass with one gradient at a time, the same weights, per-parameter clipping, exact resume)
    "fused_backward": None,
    "full_bf16": (
        {"mixed_precision": "bf16"},
        {"mixed_precision": "bf16", "full_bf16": True},
        lambda b, v: bf16_values(v.trainer.components.unet) and not bf16_values(b.trainer.components.unet),
    ),
    "device": None,
    "train_text_encoder": ({}, TEXT, differs("text")),
    "text_encoder_learning_rate": (TEXT, {**TEXT, "text_encoder_learning_rate": 1e-2}, differs("text")),
    # SDXL's second encoder: tests/test_sdxl_train.py::test_text_encoder_2_learning_rate_is_its_own_or_freezes_it
    "text_encoder_2_learning_rate": None,
    "stop_text_encoder": None,
    # LoRA / LoHa / LoKr: the adapter's file, shapes and output (tests/test_lora.py: alpha's exact scale, the WebUI's
    # math, LoHa / LoKr key families, resume, the base model untouched, diffusers reading the file)
    "training_method": (
        {},
        LORA,
        lambda b, v: v.lora.algorithm == "lora" and b.unet != v.unet and v.unet == untrained_unet(v),
    ),
    "network_rank": (
        LORA,
        {**LORA, "network_rank": 4},
        lambda b, v: ranks(b) == {16} and ranks(v) == {4} and outputs_differ(b, v) is None,
    ),
    "network_alpha": (
        LORA,
        {**LORA, "network_alpha": 16.0},
        lambda b, v: (
            {b.lora.alpha(n) for n in b.lora.layers} == {8.0}
            and {v.lora.alpha(n) for n in v.lora.layers} == {16.0}
            and outputs_differ(b, v) is None
        ),
    ),
    "network_dropout": (LORA, {**LORA, "network_dropout": 0.5}, differs("adapter")),
    "network_conv_rank": (
        LORA,
        LOCON,
        lambda b, v: (
            "lora_unet_down_blocks_0_resnets_0_conv1" in v.lora.layers - b.lora.layers
            and v.lora.tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[:2] == (4, 32)
        ),
    ),
    "network_conv_alpha": (
        LOCON,
        {**LOCON, "network_conv_alpha": 2.0},
        lambda b, v: (
            (
                b.lora.alpha("lora_unet_down_blocks_0_resnets_0_conv1"),
                v.lora.alpha("lora_unet_down_blocks_0_resnets_0_conv1"),
            )
            == (4.0, 2.0)
            and b.adapter != v.adapter
        ),
    ),
    "network_train_text_encoder": (
        LORA,
        LORA_TE,
        lambda b, v: (
            not layers(b, "lora_te_")
            and "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in layers(v, "lora_te_")
        ),
    ),
    "network_unet_lr": (
        LORA,
        {**LORA, "network_unet_lr": 1e-2},
        lambda b, v: (b.lrs[0]["group0"], v.lrs[0]["group0"]) == (1e-4, 1e-2) and b.adapter != v.adapter,
    ),
    "network_text_encoder_lr": (
        LORA_TE,
        {**LORA_TE, "network_text_encoder_lr": 1e-2},
        lambda b, v: (
            (b.lrs[0]["group1"], v.lrs[0]["group1"]) == (5e-5, 1e-2)
            and digest(b.lora.tensors) != digest(v.lora.tensors)
        ),
    ),
    "network_init_from": None,  # tests/test_lora.py: test_network_init_from_continues_from_the_file
    "lora_dir": (
        LORA,
        {**LORA, "lora_dir": "loras"},
        lambda b, v: (
            (v.out / "loras" / "dreambooth_2.safetensors").is_file()
            and not (v.out / "dreambooth_2.safetensors").exists()
        ),
    ),
    "clip_skip": None,  # test_clip_skip_uses_the_nth_last_layer
    "save_model_every_n_steps": (
        {},
        {"save_model_every_n_steps": 1},
        lambda b, v: [p.name for p in v.result.checkpoints] == ["dreambooth_1.safetensors", "dreambooth_2.safetensors"],
    ),
    "save_training_state": ({}, {"save_training_state": False}, lambda b, v: not (v.out / "state").exists()),
    "save_total_limit": (
        {"save_model_every_n_steps": 1},
        {"save_model_every_n_steps": 1, "save_total_limit": 1},
        lambda b, v: (
            sorted(p.name for p in b.out.glob("*.safetensors"))
            == ["dreambooth_1.safetensors", "dreambooth_2.safetensors"]
            and sorted(p.name for p in v.out.glob("*.safetensors")) == ["dreambooth_2.safetensors"]
        ),
    ),
    "save_sample_prompt": (SAMPLES, {**SAMPLES, "save_sample_prompt": "a zwx ring in space"}, images_differ("samples")),
    "save_sample_negative_prompt": (
        SAMPLES,
        {**SAMPLES, "save_sample_negative_prompt": "blurry"},
        images_differ("samples"),
    ),
    "n_save_sample": ({}, {"n_save_sample": 2}, count("samples", 2)),
    "save_infer_steps": (SAMPLES, {**SAMPLES, "save_infer_steps": 3}, images_differ("samples")),
    "save_guidance_scale": (SAMPLES, {**SAMPLES, "save_guidance_scale": 1.5}, images_differ("samples")),
    "sample_seed": (SAMPLES, {**SAMPLES, "sample_seed": 7}, images_differ("samples")),
    "test_prompt": ({}, TESTS, count("tests", 1)),
    "test_prompts_file": None,
    "test_negative_prompt": (TESTS, {**TESTS, "test_negative_prompt": "blurry"}, images_differ("tests")),
    "test_seed": (TESTS, {**TESTS, "test_seed": 5}, images_differ("tests")),
    "test_images_per_prompt": ({}, {**TESTS, "test_images_per_prompt": 2}, count("tests", 2)),
    "report_to": ({}, {"report_to": "tensorboard"}, lambda b, v: any((v.out / "logs").rglob("events.out.*"))),
    "logging_dir": (
        {"report_to": "tensorboard"},
        {"report_to": "tensorboard", "logging_dir": "tb"},
        lambda b, v: any((v.out / "tb").rglob("events.out.*")),
    ),
    "concept.instance_data_dir": None,
    "concept.instance_prompt": ({}, {"concept": {"instance_prompt": "photo of qlx ring"}}, differs("unet")),
    "concept.class_data_dir": None,
    "concept.class_prompt": (PRIOR, {**PRIOR, "concept": {"class_prompt": "photo of a donut"}}, None),
    "concept.class_negative_prompt": (PRIOR, {**PRIOR, "concept": {"class_negative_prompt": "blurry"}}, None),
    # validation loss, save_best, per-concept weight and repeats (tests/test_validation_loss.py shows each in full)
    "validation_split": (
        {},
        {"validation_split": 0.34},
        lambda b, v: not b.validation and [s for s, _ in v.validation] == [2] and len(v.trainer.held_out) == 1,
    ),
    "validation_steps": (
        {"validation_split": 0.34, "max_train_steps": 3},
        {"validation_split": 0.34, "max_train_steps": 3, "validation_steps": 1},
        lambda b, v: [s for s, _ in b.validation] == [3] and [s for s, _ in v.validation] == [1, 2, 3],
    ),
    "save_best": (
        {"validation_split": 0.34},
        {"validation_split": 0.34, "save_best": True},
        lambda b, v: (
            not (b.out / "dreambooth_best.safetensors").exists() and (v.out / "dreambooth_best.safetensors").is_file()
        ),
    ),
    "concept.loss_weight": (  # one concept, no class images: the whole loss is halved
        {"max_train_steps": 1},
        {"max_train_steps": 1, "concept": {"loss_weight": 0.5}},
        lambda b, v: v.losses[0][0] == pytest.approx(0.5 * b.losses[0][0], rel=1e-6),
    ),
    "concept.repeats": (  # one epoch of 3 images: 3 steps; each image twice: 6
        {"max_train_steps": None, "num_train_epochs": 1},
        {"max_train_steps": None, "num_train_epochs": 1, "concept": {"repeats": 2}},
        lambda b, v: (b.result.step, v.result.step) == (3, 6),
    ),
    "concept.validation_data_dir": None,  # test_validation_loss.py: ..._moves_with_them, ...does_not_change_...
    "concept.num_class_images": ({}, {**PRIOR, "concept": {"num_class_images": 3}}, count("../class", 3)),
    "concept.sample_prompt": (
        SAMPLES,
        {**SAMPLES, "concept": {"sample_prompt": "zwx ring, drawing"}},
        images_differ("samples"),
    ),
}
CLASS_IMAGE_ROWS = {"class_inference_steps", "concept.class_prompt", "concept.class_negative_prompt"}


def test_every_field_has_a_row():
    names = {f.name for f in dataclasses.fields(Settings)} | {f"concept.{f.name}" for f in dataclasses.fields(Concept)}
    assert names == set(ROWS)


@pytest.mark.parametrize("field", [name for name, row in ROWS.items() if row is not None])
def test_field_changes_behaviour(field, train, tmp_path):
    base_changes, variant_changes, check = ROWS[field]
    base_changes, variant_changes = dict(base_changes), dict(variant_changes)
    base_concept, variant_concept = base_changes.pop("concept", None), variant_changes.pop("concept", None)
    if field in CLASS_IMAGE_ROWS:  # class images land in class_data_dir: give each run its own
        base_concept = {**(base_concept or {}), "class_data_dir": str(tmp_path / "class-base")}
        variant_concept = {**(variant_concept or {}), "class_data_dir": str(tmp_path / "class-variant")}
    base = train(concept=base_concept, **base_changes)
    variant = train(concept=variant_concept, **variant_changes)
    if field in CLASS_IMAGE_ROWS:
        assert base.images("../class-base") != variant.images("../class-variant")
        return
    assert check(base, variant) is not False


def test_base_model_choice(train, tmp_path):
    from dreambooth.models.tiny import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", seed=1, name="other")
    assert train().unet != train(pretrained_model_name_or_path=str(other)).unet


def test_separate_vae_is_used_and_saved(train, tmp_path):
    from safetensors.torch import save_file

    from dreambooth.models.components import to_original_state_dict
    from dreambooth.models.files import read_state_dict
    from dreambooth.models.tiny import tiny_components

    full = to_original_state_dict(tiny_components(seed=5))
    vae_file = tmp_path / "other.vae.safetensors"
    save_file(
        {k[len("first_stage_model.") :]: v for k, v in full.items() if k.startswith("first_stage_model.")},
        str(vae_file),
    )  # a bare VAE file, as people download them
    base, variant = train(), train(pretrained_vae_name_or_path=str(vae_file))
    assert base.unet != variant.unet
    written, _ = read_state_dict(variant.result.checkpoints[-1])
    key = "first_stage_model.decoder.conv_out.weight"
    assert torch.equal(written[key], full[key])


def test_half_precision_output(train):
    from dreambooth.models.files import read_state_dict

    tensors, _ = read_state_dict(train(save_half=True).result.checkpoints[-1])
    assert {t.dtype for t in tensors.values() if t.is_floating_point()} == {torch.float16}


def test_resume_from_continues_at_the_saved_step(train, tmp_path):
    first = train(max_train_steps=2)
    resumed = train(max_train_steps=3, resume_from=str(first.result.state_dir))
    assert resumed.result.step == 3 and len(resumed.lrs) == 1


def test_sample_batch_size_sets_the_generation_batches(train, monkeypatch, tmp_path):
    from diffusers import StableDiffusionPipeline

    calls = []
    original = StableDiffusionPipeline.__call__

    def counting(self, *args, **kwargs):
        calls.append(len(kwargs["prompt_embeds"]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionPipeline, "__call__", counting)
    train(concept={"class_data_dir": str(tmp_path / "c1")}, num_class_images=4, sample_batch_size=4, **PRIOR)
    assert calls == [4]
    calls.clear()
    train(concept={"class_data_dir": str(tmp_path / "c2")}, num_class_images=4, sample_batch_size=2, **PRIOR)
    assert calls == [2, 2]


def only_for(monkeypatch, package: str, answer) -> None:
    """``importlib.util.find_spec`` answers ``answer`` for ``package`` only (it is the process-wide function: a fake
    that answered for every name broke the CLIP vocabulary lookup, which also asks it)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        "dreambooth.validation.importlib.util.find_spec",
        lambda name, *a, **k: answer if name == package else real(name, *a, **k),
    )


def test_eight_bit_adam_is_asked_of_bitsandbytes(make_settings, monkeypatch):
    """bitsandbytes' AdamW8bit with the settings' hyper-parameters, tried on the device first: a device it cannot run
    on is refused before training with a reason (tests/test_paramwise.py trains with the real one on the CPU)."""
    from dreambooth.train import optim

    made = []

    class Refusing:
        def __init__(self, groups, **kwargs):
            made.append(kwargs)

        def step(self):
            raise RuntimeError("no kernel for this device")

    fake = types.ModuleType("bitsandbytes")
    fake.__version__ = "0.0-test"
    fake.optim = types.SimpleNamespace(AdamW8bit=Refusing)
    monkeypatch.setitem(sys.modules, "bitsandbytes", fake)
    only_for(monkeypatch, "bitsandbytes", object())
    settings = make_settings(optimizer="adamw_8bit", adam_beta1=0.8)
    with pytest.raises(
        DreamBoothError,
        match=r"optimizer adamw_8bit: bitsandbytes 0.0-test cannot run 8-bit AdamW on the cpu device "
        r"\(RuntimeError: no kernel for this device\). Update bitsandbytes, or choose optimizer adamw.",
    ):
        Trainer(settings).run()
    fake.optim.AdamW8bit = type("Working", (Refusing,), {"step": lambda self: None})
    assert isinstance(optim.make_optimizer([{"params": [], "lr": 1.0}], settings, "cpu"), fake.optim.AdamW8bit)
    assert made[-1]["betas"] == (0.8, 0.999)
    only_for(monkeypatch, "bitsandbytes", None)
    assert any("bitsandbytes" in p for p in make_settings(optimizer="adamw_8bit").validate())


def test_cache_latents_encodes_each_image_once_and_reuses_the_disk_cache(train, monkeypatch):
    from diffusers import AutoencoderKL

    calls = []
    original = AutoencoderKL.encode
    monkeypatch.setattr(
        AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(len(x)) or original(self, x, *a, **k)
    )
    cached = train(max_train_steps=4)
    assert len(calls) == 3  # three images, once each, whatever the steps
    calls.clear()
    train(max_train_steps=4, output_dir=str(cached.out))
    assert calls == []  # the second run reads the on-disk cache
    train(max_train_steps=4, cache_latents=False)
    assert len(calls) == 4  # the naive way: one encode per sample per step


def test_attention_backend_xformers(make_settings, monkeypatch):
    only_for(monkeypatch, "xformers", None)
    assert any("xformers" in p for p in make_settings(attention="xformers").validate())
    from diffusers import UNet2DConditionModel

    called = []
    only_for(monkeypatch, "xformers", object())
    monkeypatch.setattr(
        UNet2DConditionModel, "enable_xformers_memory_efficient_attention", lambda self: called.append(1)
    )
    Trainer(make_settings(attention="xformers")).run()
    assert called == [1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused(make_settings):
    with pytest.raises(DreamBoothError, match="no CUDA GPU"):
        Trainer(make_settings(device="cuda")).run()
    with pytest.raises(SettingsError, match="device"):
        make_settings(device="tpu").raise_if_invalid()


def test_mixed_precision_fp16_on_cpu_is_refused(make_settings):
    assert any("fp16 needs a CUDA GPU" in p for p in make_settings(mixed_precision="fp16").validate())


def test_stop_text_encoder_freezes_it_after_its_fraction(train):
    stopped = train(max_train_steps=4, stop_text_encoder=0.5, **TEXT)
    two_steps = train(max_train_steps=2, **TEXT)
    assert stopped.text == two_steps.text
    assert stopped.unet != two_steps.unet  # the UNet went on training


def test_test_prompts_file(train, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a zwx ring\n\nzwx ring on a plate\n")
    assert len(train(test_prompts_file=str(prompts)).images("tests")) == 2


def test_instance_and_class_folders(train, tmp_path):
    other = tmp_path / "other-instance"
    draw_subject(other, count=2, seed=9)
    assert train().unet != train(concept={"instance_data_dir": str(other)}).unet
    target = tmp_path / "my-class-folder"
    train(concept={"class_data_dir": str(target)}, **PRIOR)
    assert len(list(target.glob("*.png"))) == 2


def test_report_to_wandb_logs_each_step(make_settings, monkeypatch, tmp_path):
    """wandb is optional: absent, the settings say so; present, every step's loss and learning rate go to it."""
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        "dreambooth.validation.importlib.util.find_spec",
        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a),
    )
    assert any("wandb package" in p for p in make_settings(report_to="wandb").validate())

    logged, finished, started = [], [], []

    class FakeRun:
        def log(self, values, step):
            logged.append((step, values))

        def finish(self):
            finished.append(True)

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: started.append(kwargs) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(
        "dreambooth.validation.importlib.util.find_spec",
        lambda name, *a: object() if name == "wandb" else real_find_spec(name, *a),
    )
    Trainer(make_settings(report_to="wandb", logging_dir="wb", max_train_steps=3)).run()
    assert [step for step, _ in logged] == [1, 2, 3]
    assert {"loss", "lr/group0"} <= set(logged[0][1])
    assert finished == [True]
    assert started[0]["dir"].endswith("wb") and started[0]["config"]["report_to"] == "wandb"


# ---------------------------------------------------------------------------------------------------------------
# Fields whose right effect is checkable: each test shows that effect, not only that the weights changed.


def test_prior_loss_weight_scales_the_prior_term(train):
    """The step's loss is instance + weight x prior: the same first step with weights 1 and 0.25."""
    (full,) = train(max_train_steps=1, **PRIOR).losses
    (quarter,) = train(max_train_steps=1, prior_loss_weight=0.25, **PRIOR).losses
    assert full[2] is not None and full[2] > 0
    assert quarter[1:] == pytest.approx(full[1:], rel=1e-6)  # same weights, same batch: same parts
    assert full[0] == pytest.approx(full[1] + full[2], rel=1e-6)
    assert quarter[0] == pytest.approx(quarter[1] + 0.25 * quarter[2], rel=1e-6)


def test_learning_rate_scales_the_first_update(train, tiny_checkpoint):
    """AdamW's first update (and its decoupled weight decay) is proportional to the learning rate."""
    from dreambooth.models.components import load_components

    before = load_components(tiny_checkpoint("sd1")).unet.state_dict()
    one = train(max_train_steps=1, learning_rate=1e-4).trainer.components.unet.state_dict()
    three = train(max_train_steps=1, learning_rate=3e-4).trainer.components.unet.state_dict()
    delta_one = torch.cat([(one[k] - before[k]).flatten() for k in before])
    delta_three = torch.cat([(three[k] - before[k]).flatten() for k in before])
    assert delta_one.norm() > 0
    assert (delta_three.norm() / delta_one.norm()).item() == pytest.approx(3.0, rel=1e-3)
    # elementwise too, up to fp32 rounding of weight + delta (deltas are about 1e-4)
    torch.testing.assert_close(delta_three, 3 * delta_one, rtol=1e-3, atol=1e-7)


def test_max_grad_norm_bounds_the_gradient_the_optimizer_sees(train):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    norms = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    handle = register_optimizer_step_pre_hook(record)
    try:
        train(max_train_steps=2, max_grad_norm=0.0)
        unclipped, norms[:] = list(norms), []
        train(max_train_steps=2, max_grad_norm=1e-4)
        clipped = list(norms)
    finally:
        handle.remove()
    assert len(unclipped) == len(clipped) == 2
    assert min(unclipped) > 1e-3  # without clipping the gradient is far larger than the bound
    assert max(clipped) <= 1e-4 * (1 + 1e-4)
    assert max(clipped) == pytest.approx(1e-4, rel=1e-3)  # clipped to the bound, not below it


def test_mixed_precision_runs_the_unet_in_that_dtype(make_settings, tiny_checkpoint):
    from dreambooth.models.components import load_components

    def unet_dtypes(**changes) -> set:
        components = load_components(tiny_checkpoint("sd1"))
        seen = set()
        for module in components.unet.modules():
            if isinstance(module, torch.nn.Linear):
                module.register_forward_hook(lambda m, i, o: seen.add(o.dtype) if torch.is_grad_enabled() else None)
        Trainer(make_settings(**changes), components=components).run()
        return seen

    assert unet_dtypes() == {torch.float32}
    assert unet_dtypes(mixed_precision="bf16") == {torch.bfloat16}


def test_clip_skip_uses_the_nth_last_layer(train):
    """The cached conditioning of clip_skip 2 is the second-to-last hidden state through the final layer norm."""
    run = train(max_train_steps=1, clip_skip=2)
    components = run.trainer.components
    prompt = "photo of zwx ring"
    ids = components.tokenizer(
        [prompt], padding="max_length", max_length=components.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        output = components.text_encoder(ids, output_hidden_states=True)
        norm = next(m for name, m in components.text_encoder.named_modules() if name.endswith("final_layer_norm"))
        expected = norm(output.hidden_states[-2])[0]
        last = output.last_hidden_state[0]
    cached = run.trainer.text_cache[prompt]
    torch.testing.assert_close(cached, expected)
    assert not torch.allclose(cached, last)
    torch.testing.assert_close(train(max_train_steps=1).trainer.text_cache[prompt], last)


def test_center_crop_encodes_the_middle_of_each_image(train, monkeypatch, tmp_path):
    """The instance images are 96x64; at 64 px the centre crop is columns 16..80 of each."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    encoded = []
    original = AutoencoderKL.encode
    monkeypatch.setattr(
        AutoencoderKL,
        "encode",
        lambda self, x, *a, **k: encoded.extend(x.detach().clone()) or original(self, x, *a, **k),
    )

    def middles() -> list:
        return [
            torch.from_numpy(
                np.asarray(Image.open(p).convert("RGB"), dtype=np.float32)[:, 16:80] / 127.5 - 1.0
            ).permute(2, 0, 1)
            for p in sorted((tmp_path / "instance").glob("*.png"))
        ]

    def matches(tensors: list) -> int:
        return sum(any(torch.allclose(t, m, atol=1e-6) for m in middles()) for t in tensors)

    train(max_train_steps=1, center_crop=True)
    assert len(encoded) == 3 and matches(encoded) == 3
    encoded.clear()
    train(max_train_steps=1, center_crop=False)
    assert len(encoded) == 3 and matches(encoded) < 3  # random offsets: not every crop is the middle


class Log(Callbacks):
    def __init__(self):
        self.lines = []

    def on_log(self, message):
        self.lines.append(message)


def test_low_memory_without_a_gpu_size_turns_every_memory_switch_on(make_settings):
    """On the CPU with gpu_memory_gb 0 the GPU's size is not known: every switch that keeps what is trained."""
    from dreambooth.memory.fit import SWITCHES

    log = Log()
    trainer = Trainer(make_settings(low_memory=True), callbacks=log)
    trainer.run()
    s = trainer.settings
    assert s.mixed_precision == "bf16" and s.optimizer == "adamw_8bit" and s.gradient_checkpointing and s.cache_latents
    for switch in SWITCHES:  # fused_backward and full_bf16 too, in the versions that have them
        if switch.keeps_training and hasattr(s, switch.name):
            assert switch.value(s) is None, f"{switch.name} is not on"
    assert trainer.components.unet.is_gradient_checkpointing
    assert any("not known, so every memory switch" in line for line in log.lines)
    untouched = Trainer(make_settings())
    untouched.run()
    assert untouched.settings.mixed_precision == "no" and not untouched.settings.gradient_checkpointing


def test_low_memory_applies_the_fit_preset_chosen_for_gpu_memory_gb(make_settings, monkeypatch):
    """A scripted estimate (8 GiB; mixed precision saves 0.5, 8-bit AdamW 1, checkpointing 3): a 6 GB GPU gets
    mixed precision and checkpointing (8-bit AdamW is not needed once checkpointing is on), a 9 GB GPU nothing."""
    from dreambooth.memory import fit

    seen = []

    def scripted(settings, arch=None, processes=1):
        seen.append(settings)
        total = 8.0 - 0.5 * (settings.mixed_precision != "no") - 1.0 * (settings.optimizer == "adamw_8bit")
        total -= 3.0 * settings.gradient_checkpointing
        return types.SimpleNamespace(
            total_bytes=int(total * 2**30), breakdown={"weights": int(total * 2**30)}, constants={}, arch_name="x"
        )

    monkeypatch.setattr(fit, "_default_estimate", scripted)
    log = Log()
    trainer = Trainer(make_settings(low_memory=True, gpu_memory_gb=6.0), callbacks=log)
    trainer.run()
    s = trainer.settings
    assert (s.mixed_precision, s.gradient_checkpointing, s.optimizer) == ("bf16", True, "adamw")
    assert trainer.components.unet.is_gradient_checkpointing
    assert any(
        "low_memory (fit my GPU, 6.0 GiB): mixed_precision bf16, gradient_checkpointing on; estimated peak 4.50 GiB, "
        "fits" in line
        for line in log.lines
    ), log.lines
    assert seen and all(x.pretrained_model_name_or_path == s.pretrained_model_name_or_path for x in seen)

    roomy = Trainer(make_settings(low_memory=True, gpu_memory_gb=9.0))
    roomy.run()
    assert (roomy.settings.mixed_precision, roomy.settings.gradient_checkpointing) == ("no", False)
    assert not roomy.components.unet.is_gradient_checkpointing
