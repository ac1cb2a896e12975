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
from dreambooth.ui.form import concept_specs, settings_from_values, settings_specs

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
    "db_memory_estimate",
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
    "db_switched_checkpoint",
    "db_lora_tag",
}


@pytest.fixture
def tab(tmp_path, tiny_checkpoint):
    import shutil

    from dreambooth.ui.tab import build_tab

    source = tiny_checkpoint("sd1")
    folder = tmp_path / "models" / "Stable-diffusion"
    folder.mkdir(parents=True)
    for path in (source, source.with_suffix(".yaml")):  # the models folder holds one base model
        shutil.copy(path, folder / path.name)
    host = Host(tmp_path / "models", allowed_roots=[tmp_path, source.parent])
    runner = Runner(host)
    blocks, tab = build_tab(host, runner)
    tab.blocks = blocks
    return tab


def form_args(tab, settings: Settings) -> dict:
    """The input the Train / Save buttons receive for ``settings`` (``{component: value}``, first concept shown)."""
    data = tab.widget_values(settings)
    data[tab.controls["concept_index"]] = "1"
    return data


def named(tab, result: dict) -> dict:
    """A handler's ``{component: value}`` answer keyed by field / control name."""
    names = {id(w): n for group in (tab.widgets, tab.concept_widgets, tab.controls) for n, w in group.items()}
    return {names[id(component)]: value for component, value in result.items()}


def _dependencies(tab, handler=None, trigger=None):
    for index, (fn, dependency) in enumerate(zip(tab.blocks.fns, tab.blocks.dependencies)):
        if fn.fn is not None and (handler is None or fn.fn == handler) and trigger in (None, dependency["trigger"]):
            yield index, fn, dependency


def event(tab, handler, *args) -> dict:
    """Call ``handler`` as the page's event does and return what reaches each output, by elem_id, after gradio's
    own mapping of the answer onto the event's outputs (a surplus or missing value shows here as in the browser)."""
    [(index, _, dependency)] = list(_dependencies(tab, handler))
    return _outputs(tab, index, dependency, handler(*args))


def _outputs(tab, index, dependency, answer) -> dict:
    values = tab.blocks.postprocess_data(index, answer, state={})
    blocks = [tab.blocks.blocks[i] for i in dependency["outputs"]]
    return {block.elem_id or block: value for block, value in zip(blocks, values)}


def page_load(tab) -> dict:
    """What the page's load events put into each output (by elem_id), as gradio sends it to the browser."""
    shown = {}
    for index, fn, dependency in _dependencies(tab, trigger="load"):
        inputs = [tab.blocks.blocks[i].value for i in dependency["inputs"]]  # a fresh page: initial values
        answer = fn.fn(dict(zip(fn.inputs, inputs))) if fn.inputs_as_dict else fn.fn(*inputs)
        shown.update(_outputs(tab, index, dependency, answer))
    return shown


def test_every_settings_field_has_exactly_one_widget_and_every_widget_a_field(tab):
    ids = [getattr(b, "elem_id", None) for b in tab.blocks.blocks.values()]
    ids = [i for i in ids if i and i.startswith("db_") and not i.startswith(("db_panel_", "db_group_", "db_tool_"))]
    assert len(ids) == len(set(ids)), "an elem_id is used twice"
    expected = {f"db_{f.name}" for f in fields() if f.name != "concepts" and not f.metadata["headless_only"]}
    expected |= {f"db_concept_{f.name}" for f in dataclasses.fields(Concept)}
    assert set(ids) - CONTROLS == expected
    headless = {f"db_{f.name}" for f in fields() if f.metadata["headless_only"]}
    assert headless == {"db_output_dir", "db_checkpoint_dir", "db_lora_dir", "db_device"} and not headless & set(ids)


def _places(tab) -> dict:
    """elem_id -> (the panels and accordions around it, outermost first, as (kind, title, open))."""
    places = {}

    def walk(block, around):
        kind = type(block).__name__
        if kind in ("Tab", "TabItem", "Accordion"):
            around = (*around, (kind, block.label, getattr(block, "open", True)))
        if getattr(block, "elem_id", None):
            places[block.elem_id] = around
        for child in getattr(block, "children", ()):
            walk(child, around)

    walk(tab.blocks, ())
    return places


# What a first run needs (issue 12, item 30): base model, concept folder and prompt, class prompt with prior
# preservation, steps, learning rate, resolution, batch, save and sample cadence, the memory switch and preset.
FIRST_SCREEN_IDS = {
    "db_pretrained_model_name_or_path",
    "db_model_name",
    "db_concept_instance_data_dir",
    "db_concept_instance_prompt",
    "db_concept_class_prompt",
    "db_with_prior_preservation",
    "db_num_class_images",
    "db_max_train_steps",
    "db_learning_rate",
    "db_resolution",
    "db_train_batch_size",
    "db_save_model_every_n_steps",
    "db_n_save_sample",
    "db_low_memory",
    "db_low_memory_preset",
}


def test_the_first_screen_holds_a_first_runs_settings_and_the_rest_is_folded_away(tab):
    places = _places(tab)
    fields = {w.elem_id for w in (*tab.widgets.values(), *tab.concept_widgets.values())}
    for elem_id in FIRST_SCREEN_IDS:
        assert places[elem_id] == (("Tab", "Setup", True),), elem_id  # on the panel, in no accordion
    for elem_id in fields - FIRST_SCREEN_IDS:  # everything else: reachable, one click away
        around = places[elem_id]
        assert around[0][:2] == ("Tab", "Setup") and around[-1][0] == "Accordion", elem_id
        assert around[-1][2] is False and around[-1][1], elem_id
    # compact rows: the first screen's fields share rows, several to a row
    rows = {}
    for elem_id in FIRST_SCREEN_IDS:
        block = next(b for b in tab.blocks.blocks.values() if getattr(b, "elem_id", None) == elem_id)
        row = block.parent
        while type(row).__name__ == "Form":  # gradio groups neighbouring form fields in a Form
            row = row.parent
        assert type(row).__name__ == "Row", elem_id
        rows.setdefault(id(row), []).append(elem_id)
    assert len(rows) <= 5 and all(len(members) >= 2 for members in rows.values())


def test_masked_loss_sits_with_the_loss_options_and_its_mask_tool_with_the_dataset_tools(tab):
    places = _places(tab)
    for elem_id in ("db_masked_loss", "db_masked_loss_unmasked_weight"):
        assert places[elem_id][-1][:2] == ("Accordion", "Loss weighting and noise"), elem_id
    assert places["db_tool_masks_run"][0][:2] == ("Tab", "Dataset tools")
    weight = tab.widgets["masked_loss_unmasked_weight"]
    assert (weight.minimum, weight.maximum, weight.value) == (0.0, 1.0, 0.0)


def test_one_line_values_are_one_line_and_the_model_list_shows_titles(tab):
    for name in ("model_name", "caption_template", "pretrained_vae_name_or_path", "save_sample_prompt"):
        assert (tab.widgets[name].lines, tab.widgets[name].max_lines) == (1, 1), name
    for name in ("concept_instance_prompt", "concept_instance_data_dir", "concept_class_prompt"):
        assert tab.concept_widgets[name].max_lines == 1, name
    model = tab.widgets["pretrained_model_name_or_path"]
    assert model.choices == ["tiny-sd1.safetensors"] and model.value == "tiny-sd1.safetensors"
    assert tab.controls["refresh_models"].size == "sm" and tab.controls["use_checkpoint"].size == "sm"
    # a title in the form is the file for the trainer; a typed path stays a path
    path = str(tab.host.checkpoint_dir / "tiny-sd1.safetensors")
    data = form_args(tab, Settings(pretrained_model_name_or_path=path))
    assert data[model] == "tiny-sd1.safetensors" and tab.gather(data).pretrained_model_name_or_path == path
    data[model] = "/elsewhere/model.safetensors"
    assert tab.gather(data).pretrained_model_name_or_path == "/elsewhere/model.safetensors"


def test_fields_show_a_label_for_people_and_the_settings_key_in_their_help(tab):
    """Item 28: the widget's label is the schema's ``label``, the key (the guide's name) stays in the help; a
    field without a label yet shows its key."""
    from dreambooth.ui.form import _spec

    @dataclasses.dataclass
    class Probe:
        base: str = dataclasses.field(default="", metadata={"help": "The base.", "group": "model", "label": "Base"})
        plain: str = dataclasses.field(default="", metadata={"help": "No label yet.", "group": "model"})

    labelled, plain = (_spec(f) for f in dataclasses.fields(Probe))
    assert labelled.label == "Base" and "The base." in labelled.info and "base" in labelled.info
    assert plain.label == "plain" and "No label yet." in plain.info
    for spec in (*tab.specs, *tab.concept_fields):
        widget = tab.widgets.get(spec.name) or tab.concept_widgets[spec.name]
        assert widget.label == spec.label and spec.help in widget.info
        assert spec.key in widget.info or spec.label == spec.key, spec.name  # the key shows in one of the two


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
    message = named(tab, tab.save_settings(form_args(tab, settings)))["settings_message"]
    saved = tab.host.settings_dir / "ring.json"
    assert saved.is_file(), message

    assert "Started" in named(tab, tab.train(form_args(tab, settings)))["message"]  # on the runner's thread
    assert tab.runner.wait(WAIT_SECONDS) and tab.runner.snapshot().state == "finished"
    from_tab, _ = read_state_dict(tab.runner.snapshot().checkpoints[-1])

    cli_out = tmp_path / "cli"
    overrides = ["--set", f"output_dir={cli_out}", "--set", "checkpoint_dir="]
    assert main(["train", "--config", str(saved), *overrides]) == 0
    from_cli, _ = read_state_dict(cli_out / "ring_3.safetensors")
    unet = [k for k in from_tab if k.startswith("model.diffusion_model.")]
    assert unet and all(torch.equal(from_tab[k], from_cli[k]) for k in unet)


def test_train_with_problems_says_what_is_wrong_and_starts_nothing(make_settings, tab):
    message = named(tab, tab.train(form_args(tab, make_settings(resolution=100))))["message"]
    assert message.startswith("**Cannot start:**") and "multiple of 8" in message
    assert tab.runner.snapshot().state == "idle"


def concept_data(tab, concepts, index, concept=None) -> dict:
    """The concept editor's input: the list, the selector and the editor showing ``concept``."""
    editor = tab._editor_values(concept if concept is not None else concepts[int(index) - 1])
    return {tab.controls["concepts"]: concepts, tab.controls["concept_index"]: index, **editor}


def test_concept_editor_add_edit_remove(tab):
    concepts = [Concept(instance_prompt="photo of ohwx dog").__dict__]
    added = named(tab, tab.add_concept(concept_data(tab, concepts, "1")))
    concepts, selector = added["concepts"], added["concept_index"]
    assert len(concepts) == 2 and selector["value"] == "2"
    edited = {s.key: "" for s in concept_specs()} | {"instance_prompt": "photo of zwx cat"}
    concepts = named(tab, tab.edit_concept(concept_data(tab, concepts, "2", edited)))["concepts"]
    assert concepts[1]["instance_prompt"] == "photo of zwx cat" and concepts[0]["instance_prompt"].endswith("dog")
    shown = named(tab, tab.select_concept({tab.controls["concepts"]: concepts, tab.controls["concept_index"]: "1"}))
    assert shown["concept_instance_prompt"] == "photo of ohwx dog"
    removed = named(tab, tab.remove_concept(concept_data(tab, concepts, "1")))["concepts"]
    assert [c["instance_prompt"] for c in removed] == ["photo of zwx cat"]
    again = named(tab, tab.remove_concept(concept_data(tab, removed, "1")))["concepts"]
    assert len(again) == 1  # never fewer than one (empty) concept


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
    imported = named(tab, tab.import_concepts(str(listing)))
    concepts, message = imported["concepts"], imported["concepts_message"]
    assert len(concepts) == 2 and "Imported 2" in message
    assert concepts[0]["instance_data_dir"] == str(tmp_path / "a")  # relative to the JSON's folder
    path = named(tab, tab.export_concepts(concept_data(tab, concepts, "1")))["concepts_file"]
    assert [c["instance_prompt"] for c in json.loads(Path(path).read_text())] == ["photo of ohwx dog", "zwx style"]
    failed = event(tab, tab.import_concepts, str(tmp_path / "missing.json"))
    assert "Not imported" in failed["db_concepts_message"]


def dataset_data(tab, concepts, resolution=64, buckets=False, bucket_list="") -> dict:
    """The "Check images" input: the form at its defaults with these concepts and bucket settings."""
    data = form_args(tab, Settings())
    data.update(concept_data(tab, concepts, "1"))
    data.update({tab.widgets["resolution"]: resolution, tab.widgets["use_aspect_ratio_bucket"]: buckets})
    data[tab.widgets["aspect_buckets"]] = bucket_list
    return data


def check(tab, *args, **kwargs) -> tuple[str, list]:
    shown = named(tab, tab.check_dataset(dataset_data(tab, *args, **kwargs)))
    return shown["dataset_report"], shown["thumbnails"]["value"]


def test_dataset_check_counts_images_and_names_bad_files(tab, tmp_path):
    from conftest import draw_subject

    folder = tmp_path / "ring"
    draw_subject(folder, count=2)
    (folder / "broken.png").write_bytes(b"not an image")
    concepts = [Concept(instance_data_dir=str(folder), instance_prompt="photo of ohwx ring").__dict__]
    report, thumbnails = check(tab, concepts)
    assert "3 image(s)" in report and "broken.png" in report and "| bucket |" not in report
    assert len(thumbnails) == 2 and all("broken" not in t for t in thumbnails)
    outside = [Concept(instance_data_dir="/etc", instance_prompt="x").__dict__]
    report, thumbnails = check(tab, outside)
    assert "outside the folders" in report and thumbnails == []


def test_dataset_check_shows_the_bucket_table(tab, tmp_path):
    from conftest import draw_subject

    folder = tmp_path / "shapes"
    draw_subject(folder / "wide", count=2, size=(192, 64))
    draw_subject(folder / "square", count=1, size=(96, 96))
    concepts = [Concept(instance_data_dir=str(folder), instance_prompt="photo of ohwx ring").__dict__]
    report, _ = check(tab, concepts, 128, True)
    assert "| 192x64 | 2 |" in report and "| 128x128 | 1 |" in report
    report, _ = check(tab, concepts, 128, True, "128x128")
    assert "| 128x128 | 3 |" in report
    report, _ = check(tab, concepts, 128, True, "100x100")
    assert "multiples of 8" in report


def preview(tab, instance: str, klass: str) -> str:
    widgets = tab.concept_widgets
    data = {widgets["concept_instance_prompt"]: instance, widgets["concept_class_prompt"]: klass}
    return named(tab, tab.token_preview(data))["token_preview"]


def test_token_preview_warns_about_a_poor_identifier(tab):
    assert "already means something" in preview(tab, "photo of sks dog", "photo of a dog")
    assert "becomes 2 tokens" in preview(tab, "photo of zwx dog", "photo of a dog")
    assert "warning" not in preview(tab, "photo of olis dog", "photo of a dog")


def test_poll_sends_only_what_changed(make_settings, tab):
    shown = named(tab, tab.poll({}))
    assert "Idle" in shown["status"]
    again = named(tab, tab.poll(shown["seen"]))
    assert set(again) == {"seen", "status"}  # nothing else is sent again
    tab.runner.start(tab.host.prepare(make_settings(max_train_steps=2, n_save_sample=1)))
    assert tab.runner.wait(WAIT_SECONDS)
    shown = named(tab, tab.poll(again["seen"]))
    assert "Finished" in shown["status"] and "step 2 / 2" in shown["status"]
    assert list(shown["plot"]["value"]["step"]) == [1, 2] and len(shown["samples"]["value"]) == 1
    assert shown["checkpoints"]["value"].endswith("dreambooth_2.safetensors")


def test_the_loss_plot_shows_the_validation_loss_beside_the_training_loss(make_settings, tab, tmp_path):
    from conftest import draw_subject

    held_out = tmp_path / "held_out"
    draw_subject(held_out, count=1, size=(64, 64), seed=5)
    settings = make_settings(max_train_steps=3, validation_steps=2, concept={"validation_data_dir": str(held_out)})
    tab.runner.start(tab.host.prepare(settings))
    assert tab.runner.wait(WAIT_SECONDS)
    shown = named(tab, tab.poll({}))
    plot = shown["plot"]["value"]
    rows = list(zip(plot["step"], plot["series"]))
    assert rows == [(1, "training"), (2, "training"), (3, "training"), (2, "validation"), (3, "validation")]
    validation = [loss for loss, series in zip(plot["loss"], plot["series"]) if series == "validation"]
    assert validation == [loss for _, loss in tab.runner.snapshot().validation_losses] and validation[0] > 0
    assert f"validation loss {validation[-1]:.4f}" in shown["status"]
    assert tab.controls["plot"].color == "series"  # one line per series


def test_a_deleted_run_folder_leaves_the_page_loading(make_settings, tab):
    """Item 27: a finished job's run folder deleted by hand made the next page load fail on a sample path."""
    import shutil

    settings = tab.host.prepare(make_settings(max_train_steps=2, n_save_sample=1, model_name="gone"))
    tab.runner.start(settings)
    assert tab.runner.wait(WAIT_SECONDS) and tab.runner.snapshot().samples
    shutil.rmtree(settings.output_dir)
    shown = page_load(tab)  # raised FileNotFoundError inside gradio's gallery before
    assert shown["db_samples"]["value"] == []
    assert "Finished: gone" in shown["db_status"]


def test_the_last_used_settings_and_saved_settings_come_back(make_settings, tab):
    settings = make_settings(model_name="ring", learning_rate=3e-6)
    tab.train(form_args(tab, settings))
    assert tab.runner.wait(WAIT_SECONDS)
    restored = named(tab, tab.initial())
    assert restored["model_name"] == "ring" and restored["learning_rate"] == 3e-6
    assert "last training" in restored["settings_message"]
    tab.save_settings(form_args(tab, dataclasses.replace(settings, model_name="other", learning_rate=4e-6)))
    loaded = named(tab, tab.load_settings("other"))
    assert loaded["learning_rate"] == 4e-6 and loaded["model_name"] == "other"


def test_settings_that_cannot_be_loaded_say_so_and_leave_the_form(tab):
    """Item 15: on failure the answer had one value more than the event's outputs, so the message never showed."""
    (tab.host.settings_dir).mkdir(parents=True, exist_ok=True)
    (tab.host.settings_dir / "broken.json").write_text("{not json")
    shown = event(tab, tab.load_settings, "broken")
    assert "Not loaded" in shown["db_settings_message"]
    unchanged = [value for key, value in shown.items() if key != "db_settings_message" and value is not None]
    assert unchanged and all(value["__type__"] == "update" and "value" not in value for value in unchanged)
    shown = event(tab, tab.load_settings, "")
    assert "Choose saved settings" in shown["db_settings_message"]


def test_the_architecture_line_is_filled_when_the_page_opens(tab):
    """Item 26: it was empty until the base model was changed."""
    shown = page_load(tab)
    assert "SD 1.x" in shown["db_architecture"]
    assert shown["db_pretrained_model_name_or_path"] == "tiny-sd1.safetensors"  # the list's title, not a path


def test_model_description_and_the_standalone_switch_message(tab, tiny_checkpoint):
    described = named(tab, tab.describe_model(str(tiny_checkpoint("sd1"))))
    assert "SD 1.x" in described["architecture"]
    assert "Cannot read" in named(tab, tab.describe_model("/nonexistent.safetensors"))["architecture"]
    switched = named(tab, tab.use_checkpoint("/some/file.safetensors"))
    assert "Not switched" in switched["message"] and switched["switched"] == ""
    lora = tab.host.lora_dir / "ring_2.safetensors"  # issue 14: a LoRA output says how to use it in the WebUI
    lora.parent.mkdir(parents=True, exist_ok=True)
    lora.write_bytes(b"")
    used = named(tab, tab.use_checkpoint(str(lora)))
    assert "Not used" in used["message"] and "<lora:ring_2:1>" in used["message"] and "models/Lora" in used["message"]
    assert used["lora_tag"] == "" and used["switched"] == ""


def test_low_memory_preset_sets_its_fields(tab):
    from dreambooth.ui.tab import PRESET_FIELDS

    values = named(tab, tab.low_memory_preset())
    assert set(values) <= set(PRESET_FIELDS)
    assert values["low_memory"] is True and values["train_batch_size"] == 1 and values["cache_latents"] is True
    for name in PRESET_FIELDS:
        assert name in tab.widgets


def test_every_widget_field_is_a_settings_field():
    names = {s.name for s in settings_specs()}
    assert names <= {f.name for f in fields()}


def test_a_class_folder_left_empty_stays_empty_in_the_settings_that_come_back(make_settings, tab):
    """Seen in the real WebUI: the run folder chosen for an empty class folder was remembered, so every later run --
    another name, another class prompt -- took its class images from the first run's folder (a "dog" prior trained
    on ring images).  What comes back (last Train, saved settings) is what the user entered."""
    settings = make_settings(
        model_name="ring", with_prior_preservation=True, max_train_steps=1, concept={"class_data_dir": ""}
    )
    shown = named(tab, tab.train(form_args(tab, settings)))
    assert "Started" in shown["message"], shown
    assert tab.runner.wait(WAIT_SECONDS) and tab.runner.snapshot().state == "finished"
    assert list((tab.host.run_dir("ring") / "class_images_1").glob("*.png"))  # the job used the run folder
    assert tab.host.last_used().concepts[0].class_data_dir == ""
    tab.save_settings(form_args(tab, settings))
    assert tab.host.load_settings("ring").concepts[0].class_data_dir == ""


def scripted_estimate(monkeypatch) -> None:
    """An estimate of (resolution / 64)^2 GiB, halved by gradient checkpointing (the real dry run: test_estimate.py)."""
    import types

    from dreambooth.memory import fit

    def estimate(settings, arch=None, processes=1):
        total = int((settings.resolution / 64) ** 2 * 2**30 * (0.5 if settings.gradient_checkpointing else 1.0))
        return types.SimpleNamespace(
            total_bytes=total, breakdown={"activations": total}, constants={"CUDA context": 0}, arch_name="SD 1.x"
        )

    monkeypatch.setattr(fit, "_default_estimate", estimate)


def test_the_memory_estimate_follows_the_settings_it_depends_on(make_settings, tab, monkeypatch):
    from dreambooth.ui.memory import MEMORY_FIELDS

    scripted_estimate(monkeypatch)
    dependencies = list(_dependencies(tab, tab.memory_estimate))
    triggers = {tab.blocks.blocks[d["targets"][0]].elem_id for _, _, d in dependencies if d["trigger"] == "change"}
    assert triggers == {f"db_{name}" for name in MEMORY_FIELDS if name in tab.widgets}
    assert {d["trigger"] for _, _, d in dependencies} == {"change", "then"}  # and once the page is filled
    searches = list(_dependencies(tab, tab.memory_fit))  # then, after each: what would fit
    assert len(searches) == len(dependencies) and {d["trigger"] for _, _, d in searches} == {"then"}
    assert all(not d["queue"] for _, _, d in dependencies + searches)  # never held up behind other events

    def shown(quick=False, **changes) -> str:
        handler, (index, _, dependency) = (
            (tab.memory_estimate, dependencies[0]) if quick else (tab.memory_fit, searches[0])
        )
        answer = handler(form_args(tab, make_settings(**changes)))
        return _outputs(tab, index, dependency, answer)["db_memory_estimate"]

    first = shown(quick=True, resolution=128, gpu_memory_gb=2.0)
    assert "**Estimated peak GPU memory: 4.00 GiB**" in first and first.endswith("*Working out what would fit...*")
    text = shown(resolution=128, gpu_memory_gb=2.0)
    assert "**Estimated peak GPU memory: 4.00 GiB**" in text and "| activations | 4,096 |" in text
    assert "Does not fit a 2.0 GiB GPU: 2.00 GiB too much." in text
    assert (
        "**What would fit 2.0 GiB**" in text and "- `gradient_checkpointing on`: 2.00 GiB; about 20-30% slower" in text
    )
    assert "**Estimated peak GPU memory: 1.00 GiB**" in shown(resolution=64, gpu_memory_gb=2.0)
    assert "Fits a 2.0 GiB GPU" in shown(resolution=128, gpu_memory_gb=2.0, gradient_checkpointing=True)
    fitted = shown(resolution=128, gpu_memory_gb=2.0, low_memory=True)  # the settings as the trainer will run them
    assert "With *Fit my GPU* (low_memory): mixed_precision bf16, gradient_checkpointing on." in fitted
    assert "**Estimated peak GPU memory: 2.00 GiB**" in fitted and "What would fit" not in fitted
    assert "GPU size not known" in shown(resolution=128) or torch.cuda.is_available()
    assert "Choose a base model" in shown(pretrained_model_name_or_path="")


def test_the_memory_estimate_answers_only_the_newest_request(monkeypatch):
    """Estimates run one at a time; one superseded while it waited answers nothing; a known answer is kept."""
    import threading

    from dreambooth.settings import Settings
    from dreambooth.ui import memory

    started, release, answers = threading.Event(), threading.Event(), {}
    panel = memory.MemoryPanel()

    def slow(settings, **_):
        started.set()
        release.wait(WAIT_SECONDS)
        return f"estimate of {settings.resolution}"

    def ask(resolution):
        answers[resolution] = panel.markdown(Settings(resolution=resolution))

    monkeypatch.setattr(memory, "fit_markdown", slow)
    first = threading.Thread(target=ask, args=(512,))
    first.start()
    assert started.wait(WAIT_SECONDS)
    threads = []
    for resolution in (576, 640):  # the user types on while the first runs
        threads.append(threading.Thread(target=ask, args=(resolution,)))
        threads[-1].start()
        deadline = WAIT_SECONDS
        while panel._newest != panel._key(Settings(resolution=resolution)) and deadline > 0:
            threading.Event().wait(0.01)
            deadline -= 0.01
    release.set()
    for thread in (first, *threads):
        thread.join(WAIT_SECONDS)
    assert answers == {512: "estimate of 512", 576: None, 640: "estimate of 640"}
    assert panel.markdown(Settings(resolution=512)) == "estimate of 512"  # kept: no new dry run
