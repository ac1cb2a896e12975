"""The tab's widgets and handlers, without a browser: one widget per settings field, the form <-> settings round
trip, the concept editor, the dataset check, polling, and a settings file saved from the tab that trains exactly
as the CLI trains it."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from dreambooth.host import Host
from dreambooth.runner import Runner
from dreambooth.settings import Concept, Settings, fields
from dreambooth.ui.form import concept_specs, settings_from_values, settings_specs, values_from_settings

pytestmark = pytest.mark.gradio

WAIT_SECONDS = 120
CONTROLS = {  # widgets that are not settings fields: buttons, reports, the run panel
    "db_environment",
    "db_refresh_models",
    "db_architecture",
    "db_output_note",
    "db_saved_settings",
    "db_load_settings",
    "db_save_settings",
    "db_settings_message",
    "db_concept_index",
    "db_add_concept",
    "db_remove_concept",
    "db_token_preview",
    "db_concepts_import_path",
    "db_import_concepts",
    "db_export_concepts",
    "db_concepts_file",
    "db_concepts_message",
    "db_check_dataset",
    "db_dataset_report",
    "db_thumbnails",
    "db_low_memory_preset",
    "db_train",
    "db_cancel",
    "db_save_now",
    "db_sample_now",
    "db_message",
    "db_status",
    "db_loss_plot",
    "db_samples",
    "db_checkpoints",
    "db_use_checkpoint",
    "db_log",
    "db_poll",
    "db_several_gpus",
}


@pytest.fixture
def tab(tmp_path, tiny_checkpoint):
    from dreambooth.ui.tab import build_tab

    host = Host(tmp_path / "models", allowed_roots=[tmp_path, tiny_checkpoint("sd1").parent])
    runner = Runner(host)
    blocks, tab = build_tab(host, runner)
    tab.blocks = blocks
    return tab


def form_args(tab, settings: Settings) -> tuple:
    """The inputs the Train / Save buttons receive, for ``settings`` (first concept in the editor)."""
    values, concepts = values_from_settings(settings)
    editor = [concepts[0][s.name.removeprefix("concept_")] for s in tab.concept_fields] if concepts else []
    return (*(values[s.name] for s in tab.specs), concepts, "1", *editor)


def test_every_settings_field_has_exactly_one_widget_and_every_widget_a_field(tab):
    ids = [getattr(b, "elem_id", None) for b in tab.blocks.blocks.values()]
    ids = [i for i in ids if i and i.startswith("db_") and not i.startswith(("db_panel_", "db_group_", "db_tool_"))]
    assert len(ids) == len(set(ids)), "an elem_id is used twice"
    expected = {f"db_{f.name}" for f in fields() if f.name != "concepts" and not f.metadata["headless_only"]}
    expected |= {f"db_concept_{f.name}" for f in dataclasses.fields(Concept)}
    assert set(ids) - CONTROLS == expected
    headless = {f"db_{f.name}" for f in fields() if f.metadata["headless_only"]}
    assert headless == {"db_output_dir", "db_checkpoint_dir", "db_device"} and not headless & set(ids)


def test_no_event_runs_on_a_server_timer(tab):
    """gradio's ``every=`` keeps a server-side loop that makes the WebUI's "Reload UI" hang in Blocks.close();
    progress is polled by a browser timer clicking a hidden button instead."""
    dependencies = tab.blocks.config["dependencies"]
    assert dependencies and all(d.get("every") is None for d in dependencies)
    poll_js = [d for d in dependencies if d.get("js") and "db_poll" in d["js"]]
    assert len(poll_js) == 1 and "setInterval" in poll_js[0]["js"]


def test_widgets_take_bounds_choices_and_help_from_the_schema(tab):
    lr = tab.widgets["learning_rate"]
    assert lr.minimum == 0.0 and lr.maximum == 1.0 and "Learning rate" in lr.info
    from dreambooth.settings import SCHEDULERS

    assert list(tab.widgets["lr_scheduler"].choices) == list(SCHEDULERS)
    assert tab.widgets["max_train_steps"].precision == 0
    assert type(tab.widgets["with_prior_preservation"]).__name__ == "Checkbox"


def test_form_values_and_settings_round_trip(make_settings, tab):
    settings = tab.host.prepare(
        make_settings(
            learning_rate=2e-6,
            num_train_epochs=None,
            max_train_steps=7,
            lr_scheduler="cosine",
            text_encoder_learning_rate=1e-6,
            concept={"num_class_images": 3, "class_negative_prompt": "blurry"},
        )
    )
    again = tab.host.prepare(tab.gather(form_args(tab, settings)))
    assert dataclasses.replace(again, device=settings.device) == settings


def test_empty_number_boxes_mean_none_and_integer_boxes_give_integers(make_settings):
    base = make_settings()
    values = {"max_train_steps": 12.0, "num_train_epochs": None, "text_encoder_learning_rate": ""}
    settings = settings_from_values(values, [{"instance_prompt": "x", "num_class_images": None}], base)
    assert settings.max_train_steps == 12 and isinstance(settings.max_train_steps, int)
    assert settings.num_train_epochs is None and settings.text_encoder_learning_rate is None
    assert settings.concepts[0].num_class_images is None


def test_a_settings_file_saved_from_the_tab_trains_exactly_as_the_cli(make_settings, tab, tmp_path):
    from dreambooth.cli import main
    from dreambooth.models.files import read_state_dict

    settings = make_settings(max_train_steps=3, model_name="ring")
    message, _ = tab.save_settings(*form_args(tab, settings))
    saved = tab.host.settings_dir / "ring.json"
    assert saved.is_file(), message

    assert "Started" in tab.train(*form_args(tab, settings))  # the tab's own run, on the runner's thread
    assert tab.runner.wait(WAIT_SECONDS) and tab.runner.snapshot().state == "finished"
    from_tab, _ = read_state_dict(tab.runner.snapshot().checkpoints[-1])

    cli_out = tmp_path / "cli"
    overrides = ["--set", f"output_dir={cli_out}", "--set", "checkpoint_dir="]
    assert main(["train", "--config", str(saved), *overrides]) == 0
    from_cli, _ = read_state_dict(cli_out / "ring_3.safetensors")
    unet = [k for k in from_tab if k.startswith("model.diffusion_model.")]
    assert unet and all(torch.equal(from_tab[k], from_cli[k]) for k in unet)


def test_train_with_problems_says_what_is_wrong_and_starts_nothing(make_settings, tab):
    message = tab.train(*form_args(tab, make_settings(resolution=100)))
    assert message.startswith("**Cannot start:**") and "multiple of 8" in message
    assert tab.runner.snapshot().state == "idle"


def test_concept_editor_add_edit_remove(tab):
    concepts = [Concept(instance_prompt="photo of ohwx dog").__dict__]
    added = tab.add_concept(concepts, "1", *tab._editor_values(concepts[0]))
    concepts, selector = added[0], added[1]
    assert len(concepts) == 2 and selector["value"] == "2"
    edited = {s.name: "" for s in concept_specs()} | {"concept_instance_prompt": "photo of zwx cat"}
    concepts = tab.edit_concept(concepts, "2", *[edited[s.name] for s in tab.concept_fields])
    assert concepts[1]["instance_prompt"] == "photo of zwx cat" and concepts[0]["instance_prompt"].endswith("dog")
    shown = tab.select_concept(concepts, "1")
    assert shown[[s.name for s in tab.concept_fields].index("concept_instance_prompt")] == "photo of ohwx dog"
    removed = tab.remove_concept(concepts, "1")
    assert [c["instance_prompt"] for c in removed[0]] == ["photo of zwx cat"]
    assert len(tab.remove_concept(removed[0], "1")[0]) == 1  # never fewer than one (empty) concept


def test_concepts_list_import_and_export(tab, tmp_path):
    (tmp_path / "a").mkdir()
    listing = tmp_path / "concepts_list.json"
    listing.write_text(
        json.dumps(
            [
                {"instance_prompt": "photo of ohwx dog", "class_prompt": "photo of a dog", "instance_data_dir": "a"},
                {"instance_prompt": "zwx style", "class_prompt": "a painting", "instance_data_dir": "b"},
            ]
        )
    )
    imported = tab.import_concepts(str(listing))
    concepts, message = imported[0], imported[-1]
    assert len(concepts) == 2 and "Imported 2" in message
    assert concepts[0]["instance_data_dir"] == str(tmp_path / "a")  # relative to the JSON's folder
    path, _ = tab.export_concepts(concepts, "1", *tab._editor_values(concepts[0]))
    assert [c["instance_prompt"] for c in json.loads(Path(path).read_text())] == ["photo of ohwx dog", "zwx style"]
    assert "Not imported" in tab.import_concepts(str(tmp_path / "missing.json"))[-1]


def test_dataset_check_counts_images_and_names_bad_files(tab, tmp_path):
    from conftest import draw_subject

    folder = tmp_path / "ring"
    draw_subject(folder, count=2)
    (folder / "broken.png").write_bytes(b"not an image")
    concepts = [Concept(instance_data_dir=str(folder), instance_prompt="photo of ohwx ring").__dict__]
    report, thumbnails = tab.check_dataset(concepts, "1", 64, False, "", None, None, *tab._editor_values(concepts[0]))
    assert "3 image(s)" in report and "broken.png" in report and "| bucket |" not in report
    assert len(thumbnails) == 2 and all("broken" not in t for t in thumbnails)
    outside = [Concept(instance_data_dir="/etc", instance_prompt="x").__dict__]
    report, thumbnails = tab.check_dataset(outside, "1", 64, False, "", None, None, *tab._editor_values(outside[0]))
    assert "outside the folders" in report and thumbnails == []


def test_dataset_check_shows_the_bucket_table(tab, tmp_path):
    from conftest import draw_subject

    folder = tmp_path / "shapes"
    draw_subject(folder / "wide", count=2, size=(192, 64))
    draw_subject(folder / "square", count=1, size=(96, 96))
    concepts = [Concept(instance_data_dir=str(folder), instance_prompt="photo of ohwx ring").__dict__]
    editor = tab._editor_values(concepts[0])
    report, _ = tab.check_dataset(concepts, "1", 128, True, "", None, None, *editor)
    assert "| 192x64 | 2 |" in report and "| 128x128 | 1 |" in report
    report, _ = tab.check_dataset(concepts, "1", 128, True, "128x128", None, None, *editor)
    assert "| 128x128 | 3 |" in report
    report, _ = tab.check_dataset(concepts, "1", 128, True, "100x100", None, None, *editor)
    assert "multiples of 8" in report


def test_token_preview_warns_about_a_poor_identifier(tab):
    assert "already means something" in tab.token_preview("photo of sks dog", "photo of a dog")
    assert "becomes 2 tokens" in tab.token_preview("photo of zwx dog", "photo of a dog")
    assert "warning" not in tab.token_preview("photo of olis dog", "photo of a dog")


def gr_update():
    import gradio as gr

    return gr.update()


def test_poll_sends_only_what_changed(make_settings, tab):
    seen, status, *_ = tab.poll({})
    assert "Idle" in status
    again = tab.poll(seen)
    nothing = gr_update()
    assert again[2] == nothing and again[3] == nothing and again[5] == nothing
    tab.runner.start(tab.host.prepare(make_settings(max_train_steps=2, n_save_sample=1)))
    assert tab.runner.wait(WAIT_SECONDS)
    seen, status, plot, samples, _log, checkpoints = tab.poll(seen)
    assert "Finished" in status and "step 2 / 2" in status
    assert list(plot["value"]["step"]) == [1, 2] and len(samples["value"]) == 1
    assert checkpoints["value"].endswith("dreambooth_2.safetensors")


def test_the_last_used_settings_and_saved_settings_come_back(make_settings, tab):
    settings = make_settings(model_name="ring", learning_rate=3e-6)
    tab.train(*form_args(tab, settings))
    assert tab.runner.wait(WAIT_SECONDS)
    restored = tab.initial()
    values = dict(zip((s.name for s in tab.specs), restored))
    assert values["model_name"] == "ring" and values["learning_rate"] == 3e-6
    assert "last training" in restored[-1]
    tab.save_settings(*form_args(tab, dataclasses.replace(settings, model_name="other", learning_rate=4e-6)))
    loaded = dict(zip((s.name for s in tab.specs), tab.load_settings("other")))
    assert loaded["learning_rate"] == 4e-6


def test_model_description_and_the_standalone_switch_message(tab, tiny_checkpoint):
    assert "SD 1.x" in tab.describe_model(str(tiny_checkpoint("sd1")))
    assert "Cannot read" in tab.describe_model("/nonexistent.safetensors")
    assert "Not switched" in tab.use_checkpoint("/some/file.safetensors")


def test_low_memory_preset_sets_its_fields(tab):
    from dreambooth.ui.tab import PRESET_FIELDS

    values = tab.low_memory_preset()
    assert len(values) == len(PRESET_FIELDS) and values[:3] == [True, 1, True]
    for name in PRESET_FIELDS:
        assert name in tab.widgets


def test_every_widget_field_is_a_settings_field():
    names = {s.name for s in settings_specs()}
    assert names <= {f.name for f in fields()}
