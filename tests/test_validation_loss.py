"""The validation loss, save_best, and the per-concept loss weight and repeats (issue 16)."""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import draw_subject

from dreambooth.data.dataset import BucketPlan, Example, SamplePlan, validation_examples
from dreambooth.errors import DreamBoothError
from dreambooth.events import Callbacks
from dreambooth.models.files import read_state_dict
from dreambooth.settings import Concept
from dreambooth.train import loop
from dreambooth.train.loop import Trainer, total_steps_for
from dreambooth.train.validation_loss import ValidationLoss, validation_timesteps


class Recorder(Callbacks):
    def __init__(self):
        self.validation = []  # (step, validation loss)
        self.logs = []

    def on_progress(self, progress):
        if progress.phase == "validation":
            self.validation.append((progress.step, progress.validation_loss))

    def on_log(self, message):
        self.logs.append(message)


@pytest.fixture
def held_out(tmp_path):
    folder = tmp_path / "held_out"
    draw_subject(folder, count=2, size=(64, 64), seed=5)
    return folder


def unet_state(trainer: Trainer) -> dict:
    return {k: v.clone() for k, v in trainer.components.unet.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def cpu_run() -> types.SimpleNamespace:
    """What ValidationLoss.compute reads of a RunState, for calling it after a run."""
    return types.SimpleNamespace(
        device=torch.device("cpu"),
        optimizer=types.SimpleNamespace(param_groups=[{}]),
        autocast=contextlib.nullcontext(),
    )


# ------------------------------------------------------------------------------------------------ validation loss


@pytest.mark.slow
def test_validation_loss_is_the_same_for_the_same_weights_and_moves_with_them(make_settings, held_out, tmp_path):
    """Acceptance: identical for identical weights, different when they change; every validation_steps and at the
    end; reported as progress and in the log."""
    recorder = Recorder()
    settings = make_settings(
        output_dir=str(tmp_path / "a"),
        max_train_steps=3,
        validation_steps=2,
        concept={"validation_data_dir": str(held_out)},
    )
    trainer = Trainer(settings, callbacks=recorder)
    trainer.run()
    assert [step for step, _ in recorder.validation] == [2, 3]  # every 2 steps, and the last step
    assert any("validation loss" in line for line in recorder.logs)
    last = recorder.validation[-1][1]
    assert trainer.validation.compute(cpu_run()) == last  # the weights after the run: the same number, exactly
    assert trainer.validation.compute(cpu_run()) == last
    assert recorder.validation[0][1] != last  # step 2's weights differ from step 3's
    with torch.no_grad():
        next(trainer.components.unet.parameters()).add_(0.01)
    assert trainer.validation.compute(cpu_run()) != last
    again = Recorder()
    Trainer(dataclasses.replace(settings, output_dir=str(tmp_path / "b")), callbacks=again).run()
    assert again.validation == recorder.validation  # a second run: the same numbers


@pytest.mark.slow
def test_turning_validation_on_does_not_change_the_training_run(make_settings, held_out, tmp_path):
    common = {"max_train_steps": 3, "hflip": True, "train_text_encoder": True}
    plain = Trainer(make_settings(output_dir=str(tmp_path / "plain"), **common))
    plain.run()
    recorder = Recorder()
    validated = Trainer(
        make_settings(
            output_dir=str(tmp_path / "validated"),
            validation_steps=1,
            concept={"validation_data_dir": str(held_out)},
            **common,
        ),
        callbacks=recorder,
    )
    validated.run()
    assert len(recorder.validation) == 3
    assert same(unet_state(plain), unet_state(validated))
    text_a, text_b = plain.components.text_encoder.state_dict(), validated.components.text_encoder.state_dict()
    assert all(torch.equal(text_a[k], text_b[k]) for k in text_a)


def test_validation_uses_fixed_timesteps_in_the_training_range():
    assert validation_timesteps(0, 1000) == [125, 375, 625, 875]
    assert validation_timesteps(200, 600) == [250, 350, 450, 550]


@pytest.mark.slow
def test_validation_split_holds_out_images_that_are_never_trained_on(make_settings, monkeypatch, tmp_path):
    seen = []
    original = Trainer._latent

    def recording(self, example, *args, **kwargs):
        seen.append(example.path)
        return original(self, example, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_latent", recording)
    recorder = Recorder()
    trainer = Trainer(make_settings(max_train_steps=6, validation_split=0.34, validation_steps=3), callbacks=recorder)
    trainer.run()
    (held,) = [e.path for e in trainer.validation.examples]  # 0.34 of 3 images: 1
    assert held not in seen and len(set(seen)) == 2
    assert [step for step, _ in recorder.validation] == [3, 6]


def test_validation_split_is_chosen_by_path_and_refused_when_it_leaves_nothing(make_settings):
    settings = make_settings(validation_split=0.5)
    concept = settings.concepts[0]
    examples = [Example(Path(concept.instance_data_dir) / f"{i}.png", "p", 0, False) for i in range(4)]
    trained, held = validation_examples(settings, 0, concept, examples)
    assert len(held) == 2 and sorted(trained + held, key=str) == sorted(examples, key=str)
    other_seed = dataclasses.replace(settings, seed=99)
    assert validation_examples(other_seed, 0, concept, examples)[1] == held  # the same images whatever the seed
    with pytest.raises(DreamBoothError, match=r"concept 1: validation_split 0\.9 holds out 1 of its 1 instance images"):
        validation_examples(dataclasses.replace(settings, validation_split=0.9), 0, concept, examples[:1])


@pytest.mark.slow
def test_validation_loss_goes_to_the_logger(make_settings, held_out, monkeypatch):
    logged = []

    class Writer:
        def log(self, step, values):
            logged.append((step, dict(values)))

        def close(self):
            pass

    monkeypatch.setattr(Trainer, "_logger", lambda self, out: Writer())
    Trainer(make_settings(validation_steps=1, concept={"validation_data_dir": str(held_out)})).run()
    assert [step for step, values in logged if "validation_loss" in values] == [1, 2]


def test_a_validation_split_that_leaves_nothing_to_train_is_refused_before_the_run(make_settings):
    problems = make_settings(validation_split=0.9).validate()  # 3 images: 0.9 x 3 rounds to 3
    assert "concept 1: validation_split 0.9 holds out 3 of its 3 instance images and leaves none to train on" in (
        " ".join(problems)
    )
    assert not make_settings(validation_split=0.5).validate()  # 2 of 3 held out, 1 trains


def test_save_best_without_held_out_images_is_refused(make_settings):
    problems = make_settings(save_best=True).validate()
    assert any("save_best needs a validation loss" in p for p in problems)


# ------------------------------------------------------------------------------------------------ save_best

SCRIPT = [3.0, 2.0, 2.5, 1.0, 1.5]


@pytest.fixture
def scripted(monkeypatch):
    """ValidationLoss.compute returns the scripted sequence, one value per call."""
    values = iter(SCRIPT)
    monkeypatch.setattr(ValidationLoss, "compute", lambda self, run: next(values))


@pytest.mark.slow
def test_save_best_keeps_the_checkpoint_of_the_lowest_validation_loss(make_settings, scripted, tmp_path):
    out = tmp_path / "best"
    settings = make_settings(
        output_dir=str(out),
        max_train_steps=5,
        validation_split=0.34,
        validation_steps=1,
        save_best=True,
        save_model_every_n_steps=1,
        save_total_limit=2,
        save_training_state=False,
    )
    result = Trainer(settings).run()
    best = out / "dreambooth_best.safetensors"
    tensors, metadata = read_state_dict(best)
    assert metadata["dreambooth.step"] == "4" and float(metadata["dreambooth.validation_loss"]) == 1.0
    # retention untouched: the newest two NAME_STEP files, and the best beside them
    assert sorted(p.name for p in out.glob("*.safetensors")) == [
        "dreambooth_4.safetensors",
        "dreambooth_5.safetensors",
        "dreambooth_best.safetensors",
    ]
    step_four, _ = read_state_dict(out / "dreambooth_4.safetensors")
    assert same(tensors, step_four)
    step_five, _ = read_state_dict(out / "dreambooth_5.safetensors")
    assert not same(tensors, step_five)
    assert result.checkpoints[-1].name == "dreambooth_5.safetensors"
    assert not list(out.glob(".*tmp"))  # atomic writes leave no temporary file


@pytest.mark.slow
def test_save_best_of_a_lora_run_writes_the_best_adapter_in_the_lora_folder(make_settings, scripted, tmp_path):
    from dreambooth.network.files import read_network_file

    out = tmp_path / "lora"
    settings = make_settings(
        output_dir=str(out),
        training_method="lora",
        lora_dir="Lora",
        max_train_steps=5,
        validation_split=0.34,
        validation_steps=1,
        save_best=True,
        save_model_every_n_steps=1,
    )
    Trainer(settings).run()
    best = read_network_file(out / "Lora" / "dreambooth_best.safetensors")
    assert best.metadata["dreambooth.step"] == "4"
    assert same(best.tensors, read_network_file(out / "Lora" / "dreambooth_4.safetensors").tensors)
    assert not same(best.tensors, read_network_file(out / "Lora" / "dreambooth_5.safetensors").tensors)


@pytest.mark.slow
def test_a_resumed_run_keeps_the_best_it_already_had(make_settings, monkeypatch, tmp_path):
    out = tmp_path / "resumed"
    common = {
        "output_dir": str(out),
        "validation_split": 0.34,
        "validation_steps": 1,
        "save_best": True,
        "save_model_every_n_steps": 1,
    }
    values = iter([1.0, 2.0, 3.0, 0.5])
    monkeypatch.setattr(ValidationLoss, "compute", lambda self, run: next(values))
    first = Trainer(make_settings(max_train_steps=2, **common)).run()
    assert read_state_dict(out / "dreambooth_best.safetensors")[1]["dreambooth.step"] == "1"
    Trainer(make_settings(max_train_steps=4, resume_from=str(first.state_dir), **common)).run()
    _, metadata = read_state_dict(out / "dreambooth_best.safetensors")
    assert metadata["dreambooth.step"] == "4"  # 3.0 at step 3 did not replace step 1's 1.0; 0.5 at step 4 did


# ------------------------------------------------------------------------------------------------ per concept


def two_concepts(make_settings, tmp_path, first: dict, second: dict, **changes):
    other = tmp_path / "other"
    if not other.exists():
        draw_subject(other, count=2, size=(64, 64), seed=3)
    settings = make_settings(**changes)
    concept = settings.concepts[0]
    concepts = [
        dataclasses.replace(concept, **first),
        dataclasses.replace(
            concept,
            instance_data_dir=str(other),
            instance_prompt="photo of qlx cup",
            class_data_dir=str(tmp_path / "c2"),
            **second,
        ),
    ]
    return dataclasses.replace(settings, concepts=concepts)


@pytest.mark.slow
def test_loss_weight_scales_exactly_its_concepts_instance_terms(make_settings, monkeypatch, tmp_path):
    """Batch of 2 (one sample of each concept) with prior preservation: concept 2's instance loss x 0.25, its class
    image's loss and concept 1's untouched, and total = mean instance + prior_loss_weight x mean prior by hand."""
    captured = []
    original = loop.combine_losses

    def capture(per_sample, is_prior, prior_loss_weight, counts=None):
        captured.append((per_sample.detach().clone(), is_prior.clone()))
        return original(per_sample, is_prior, prior_loss_weight, counts)

    monkeypatch.setattr(loop, "combine_losses", capture)
    common = {"max_train_steps": 1, "train_batch_size": 2, "with_prior_preservation": True, "prior_loss_weight": 0.5}
    losses = []

    class Losses(Callbacks):
        def on_progress(self, progress):
            if progress.phase == "training":
                losses.append((progress.loss, progress.instance_loss, progress.prior_loss))

    base = two_concepts(make_settings, tmp_path, {}, {}, output_dir=str(tmp_path / "base"), **common)
    Trainer(base, callbacks=Losses()).run()
    weighted = two_concepts(
        make_settings, tmp_path, {}, {"loss_weight": 0.25}, output_dir=str(tmp_path / "weighted"), **common
    )
    Trainer(weighted, callbacks=Losses()).run()
    (plain, plain_prior), (scaled, scaled_prior) = captured
    assert plain_prior.tolist() == scaled_prior.tolist() == [False, True, False, True]  # instance, its class image
    expected = plain * torch.tensor([1.0, 1.0, 0.25, 1.0])  # samples: concept 1, its class, concept 2, its class
    assert torch.equal(scaled, expected)
    instance = (plain[0] + 0.25 * plain[2]) / 2
    prior = (plain[1] + plain[3]) / 2
    assert losses[1][1] == pytest.approx(float(instance), rel=1e-6)
    assert losses[1][2] == pytest.approx(losses[0][2], rel=1e-6)
    assert losses[1][0] == pytest.approx(float(instance + 0.5 * prior), rel=1e-6)


def examples(name: str, count: int, concept: int) -> list[Example]:
    return [Example(Path(f"{name}{i}.png"), name, concept, False) for i in range(count)]


def test_repeats_set_how_often_each_image_appears_in_an_epoch():
    a, b = examples("a", 2, 0), examples("b", 3, 1)
    plan = SamplePlan([a, b], None, seed=1, hflip=False, repeats=[3, 1])
    assert plan.epoch_length == 9
    for epoch in range(3):
        paths = [plan.sample(epoch * 9 + i).instance.path for i in range(9)]
        assert Counter(paths) == {**{e.path: 3 for e in a}, **{e.path: 1 for e in b}}
        concepts = [plan.sample(epoch * 9 + i).instance.concept for i in range(9)]
        assert concepts == [0, 1, 0, 1, 0, 1, 0, 0, 0]  # turns while both have samples left
    balanced = SamplePlan([a, b], None, seed=1, hflip=False, repeats=[3, None])  # b topped up to a's 6
    counts = Counter(balanced.sample(i).instance.path for i in range(balanced.epoch_length))
    assert balanced.epoch_length == 12 and counts == {**{e.path: 3 for e in a}, **{e.path: 2 for e in b}}
    default = SamplePlan([a, b], None, seed=1, hflip=False)
    same_as_before = SamplePlan([a, b], None, seed=1, hflip=False, repeats=[None, None])
    assert [default.sample(i) for i in range(20)] == [same_as_before.sample(i) for i in range(20)]


def test_repeats_with_buckets_and_class_images():
    a, b = examples("a", 2, 0), examples("b", 2, 1)
    classes = [examples("ca", 1, 0), examples("cb", 1, 1)]
    bucket_of = {e.path: ("wide" if e.path.name.endswith("0.png") else "square") for e in a + b}
    plan = BucketPlan([a, b], classes, 2, False, bucket_of, batch_size=2, repeats=[2, 1])
    samples = [s for index in range(4) for s in plan.batch(index, 2)]  # 6 samples: batches of 2, 2, 1, 1
    assert sum(len(plan.batch(i, 2)) for i in range(len(plan._epoch_batches(0)))) == 6
    assert Counter(s.instance.path for s in samples[:6]) == {**{e.path: 2 for e in a}, **{e.path: 1 for e in b}}
    assert all(s.prior.concept == s.instance.concept for s in samples)
    for index in range(6):
        assert len({bucket_of[s.instance.path] for s in plan.batch(index, 2)}) == 1


def test_total_steps_for_counts_the_repeats(make_settings):
    settings = make_settings(max_train_steps=None, num_train_epochs=2, train_batch_size=3)
    plan = SamplePlan([examples("a", 2, 0), examples("b", 3, 1)], None, seed=1, hflip=False, repeats=[3, 1])
    assert total_steps_for(settings, plan, 5) == 6  # 2 epochs of 2 x 3 + 3 x 1 = 9 samples, batches of 3
    plain = SamplePlan([examples("a", 2, 0), examples("b", 3, 1)], None, seed=1, hflip=False)
    assert total_steps_for(settings, plain, 5) == 4  # balanced: 2 x 3 samples per epoch


@pytest.mark.slow
def test_repeats_and_loss_weight_resume_exactly(make_settings, tmp_path):
    def settings(name, **changes):
        changes.setdefault("max_train_steps", 4)
        return two_concepts(
            make_settings,
            tmp_path,
            {"repeats": 2},
            {"loss_weight": 0.5},
            output_dir=str(tmp_path / name),
            hflip=True,
            **changes,
        )

    straight = Trainer(settings("straight"))
    straight.run()
    first = Trainer(settings("split", max_train_steps=2)).run()
    resumed = Trainer(settings("split", resume_from=str(first.state_dir)))
    resumed.run()
    assert same(unet_state(straight), unet_state(resumed))


@pytest.mark.slow
def test_concept_settings_of_a_real_epoch(make_settings, monkeypatch, tmp_path):
    """repeats reach the trainer's plan: one epoch of a 2-concept run sees concept 1's 3 images twice each."""
    seen = []
    original = Trainer._latent

    def recording(self, example, *args, **kwargs):
        if not example.is_class:
            seen.append(example.path)
        return original(self, example, *args, **kwargs)

    monkeypatch.setattr(Trainer, "_latent", recording)
    settings = two_concepts(
        make_settings, tmp_path, {"repeats": 2}, {"repeats": 1}, max_train_steps=None, num_train_epochs=1
    )
    result = Trainer(settings).run()
    assert result.step == 8  # 3 x 2 + 2 x 1 samples, batch 1
    counts = Counter(p.parent.name for p in seen)
    assert counts == {"instance": 6, "other": 2} and set(Counter(seen).values()) == {2, 1}
    assert all(n == 2 for p, n in Counter(seen).items() if p.parent.name == "instance")


def test_concept_fields_are_checked(make_settings):
    settings = make_settings()
    bad = dataclasses.replace(settings, concepts=[Concept(**{**settings.concepts[0].__dict__, "repeats": 0})])
    assert any("repeats" in p for p in bad.validate())
    bad = dataclasses.replace(
        settings, concepts=[Concept(**{**settings.concepts[0].__dict__, "validation_data_dir": "/nonexistent/x"})]
    )
    assert any("validation_data_dir '/nonexistent/x' is not a folder" in p for p in bad.validate())


@pytest.mark.slow
def test_validation_of_an_inpainting_model_and_with_buckets(make_settings, tiny_checkpoint):
    """An inpainting UNet gets its mask and masked-image channels (fixed per image); with buckets a held-out image
    is encoded at its bucket, as training would."""
    recorder = Recorder()
    inpainting = Trainer(
        make_settings(
            pretrained_model_name_or_path=str(tiny_checkpoint("sd1-inpainting")),
            validation_split=0.34,
            validation_steps=1,
        ),
        callbacks=recorder,
    )
    inpainting.run()
    assert len(recorder.validation) == 2 and all(v > 0 for _, v in recorder.validation)
    assert inpainting.validation.compute(cpu_run()) == recorder.validation[-1][1]
    buckets = Trainer(make_settings(use_aspect_ratio_bucket=True, validation_split=0.34, aspect_buckets="96x64,64x64"))
    buckets.run()
    (item,) = buckets.validation.items
    width, height = buckets._size(item.example)
    assert width != height and tuple(item.latent.shape[1:]) == (height // 8, width // 8)
