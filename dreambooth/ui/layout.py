"""Where the tab's widgets sit and which events call which :class:`~dreambooth.ui.tab.Tab` handler.

The Setup panel opens on what a first run needs, in compact rows (:data:`~dreambooth.ui.form.FIRST_SCREEN_ROWS`);
every other field sits in a closed accordion named after what it holds (:data:`~dreambooth.ui.form.SECTIONS`).
Every handler gets its inputs as one ``{component: value}`` dict (inputs given as a set) and answers with one.
"""

from __future__ import annotations

from typing import Any

import gradio as gr

from .form import FIRST_SCREEN, FIRST_SCREEN_ROWS, SECTIONS, FieldSpec, empty_concept, rows, section_of

POLL_MILLISECONDS = 1000
POLL_JS = f"""() => {{
    if (window.dreamboothPoll) return;
    window.dreamboothPoll = setInterval(() => {{
        const app = document.querySelector("gradio-app");
        const root = (app && app.shadowRoot) || document;
        const status = root.querySelector("#db_status");
        const button = root.querySelector("#db_poll");
        if (button && status && status.offsetParent !== null) button.click();
    }}, {POLL_MILLISECONDS});
}}"""
# After "Use in txt2img" switched the model, the WebUI's own checkpoint dropdown (top left) still shows the old one.
# The WebUI's switch from its checkpoint cards, ``selectCheckpoint(title)`` (javascript/ui.js, v1.10.1), clicks its
# hidden "change_checkpoint" button, whose handler sets the option (already set here: nothing is loaded again) and
# answers with the option's value, which the dropdown then shows.  The standalone app has no such function.
SYNC_CHECKPOINT_JS = """(title) => {
    if (title && typeof selectCheckpoint === "function") selectCheckpoint(title);
    return [];
}"""
# "Use in txt2img" of a LoRA file: its tag goes at the end of the txt2img prompt, after what the user typed, unless the
# prompt names that network already (at any weight).  As the WebUI's own extra-network cards do (extraNetworks.js):
# set the textarea's value, then updateInput() (javascript/ui.js) so gradio takes the new value.
ADD_TO_PROMPT_JS = """(tag) => {
    const app = typeof gradioApp === "function" ? gradioApp() : document;
    const area = tag ? app.querySelector("#txt2img_prompt textarea") : null;
    if (!area) return [];
    const name = tag.slice(0, tag.lastIndexOf(":") + 1);  // "<lora:NAME:"
    if (area.value.includes(name) || area.value.includes(name.replace("<lora:", "<lyco:"))) return [];
    const typed = area.value.replace(/\\s+$/, "");
    area.value = typed ? `${typed} ${tag}` : tag;
    if (typeof updateInput === "function") updateInput(area);
    else area.dispatchEvent(new Event("input", {bubbles: true}));
    return [];
}"""
# Both after one click (a js-only event's own .then() does not run in gradio 3.41).
USE_IN_TXT2IMG_JS = f"""(title, tag) => {{
    ({SYNC_CHECKPOINT_JS})(title);
    ({ADD_TO_PROMPT_JS})(tag);
    return [];
}}"""
SMALL = {"size": "sm", "scale": 0, "min_width": 100}  # buttons beside fields: as small as their text


def field_widget(spec: FieldSpec, **layout: Any) -> Any:
    """The widget of one field: label for people, help and key as info, bounds and choices from the schema."""
    common = {"label": spec.label, "info": spec.info, "elem_id": spec.elem_id, **layout}
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(spec.default), **common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices or ()), value=spec.default, **common)
    if spec.kind in ("int", "float"):
        precision = 0 if spec.kind == "int" else None
        return gr.Number(value=spec.default, precision=precision, minimum=spec.minimum, maximum=spec.maximum, **common)
    return gr.Textbox(value=spec.default, lines=1, max_lines=1, **common)  # one line: an <input>, not a text area


def _width(spec: FieldSpec) -> dict[str, Any]:
    return {"scale": 2 if spec.is_wide else 1, "min_width": 240 if spec.is_wide else 150}


def build_layout(tab: Any, css: str | None = None) -> gr.Blocks:
    """The tab's Blocks: Setup, Run, Dataset tools; fills ``tab.widgets``, ``concept_widgets`` and ``controls``."""
    with gr.Blocks(analytics_enabled=False, elem_id="dreambooth_tab", css=css, title="DreamBooth") as blocks:
        notes = tab.host.environment_notes()
        if notes:
            gr.Markdown("\n".join(f"- {n}" for n in notes), elem_id="db_environment")
        tab.controls["concepts"] = gr.State([empty_concept()])
        with gr.Tab("Setup", elem_id="db_panel_setup"):
            _first_screen(tab)
            _sections(tab)
            _saved_settings(tab)
        with gr.Tab("Run", elem_id="db_panel_run"):
            _run_panel(tab)
        with gr.Tab("Dataset tools", elem_id="db_panel_tools"):
            from .model_tools import ModelTools
            from .tools import DatasetTools

            DatasetTools(tab.host).build()
            ModelTools(tab.host).build()
        _wire(tab, blocks)
    return blocks


def _place(tab: Any, spec: FieldSpec) -> Any:
    """Create the widget of ``spec`` (inside the current row) and register it."""
    if spec.name == "pretrained_model_name_or_path":
        default = tab.default_model()
        widget = gr.Dropdown(
            choices=[c.title for c in tab.host.list_checkpoints()],
            value=tab.model_title(default) if default else None,
            allow_custom_value=True,  # a diffusers folder or a file elsewhere can be typed
            label=spec.label,
            info=spec.info,
            elem_id=spec.elem_id,
            scale=3,
            min_width=240,
        )
    elif spec.name == "resume_from":
        widget = gr.Dropdown(
            choices=["", *tab.host.saved_states()],
            value="",
            allow_custom_value=True,
            label=spec.label,
            info=spec.info,
            elem_id=spec.elem_id,
            **_width(spec),
        )
    else:
        widget = field_widget(spec, **_width(spec))
    if spec.name.startswith("concept_"):
        tab.concept_widgets[spec.name] = widget
    else:
        tab.widgets[spec.name] = widget
    return widget


def _first_screen(tab: Any) -> None:
    specs = {s.name: s for s in (*tab.specs, *tab.concept_fields)}
    c = tab.controls
    for names in FIRST_SCREEN_ROWS:
        with gr.Row(equal_height=False, elem_classes="db-compact-row"):
            for name in names:
                if name == "concept_instance_data_dir":
                    c["concept_index"] = gr.Dropdown(
                        choices=["1"], value="1", label="Concept", elem_id="db_concept_index", scale=0, min_width=90
                    )
                if name in specs:  # a field another change removed is simply not shown
                    _place(tab, specs[name])
                if name == "pretrained_model_name_or_path":
                    c["refresh_models"] = gr.Button("Refresh", elem_id="db_refresh_models", **SMALL)
                elif name == "concept_instance_prompt":
                    c["check_dataset"] = gr.Button("Check images", elem_id="db_check_dataset", **SMALL)
                elif name == "low_memory":
                    c["low_memory_preset"] = gr.Button("Low-memory preset", elem_id="db_low_memory_preset", **SMALL)
        if names[0] == "pretrained_model_name_or_path":
            c["architecture"] = gr.Markdown(elem_id="db_architecture")
        elif names[0] == "concept_instance_data_dir":
            with gr.Column(elem_classes="db-notes"):  # style.css: no gaps while they are empty
                c["token_preview"] = gr.Markdown(elem_id="db_token_preview")
                c["dataset_report"] = gr.Markdown(elem_id="db_dataset_report")
            c["thumbnails"] = gr.Gallery(
                label="Images of the selected concept",
                columns=8,
                height=160,
                visible=False,
                elem_id="db_thumbnails",
            )


def _sections(tab: Any) -> None:
    by_section: dict[str, list[FieldSpec]] = {}
    for spec in (*tab.concept_fields, *tab.specs):
        if spec.name not in FIRST_SCREEN:
            by_section.setdefault(section_of(spec), []).append(spec)
    for section, title in SECTIONS:
        specs = by_section.get(section, [])
        if not specs and section != "concept":
            continue
        with gr.Accordion(title, open=False, elem_id=f"db_group_{section}"):
            if section == "concept":
                _concept_controls(tab)
            for row in rows(specs):
                with gr.Row(elem_classes="db-compact-row"):
                    for spec in row:
                        _place(tab, spec)
            if section == "saving":
                gr.Markdown(
                    f"Checkpoints are written to `{tab.host.checkpoint_dir}`; samples, logs and the training state "
                    f"to `{tab.host.runs_dir}/NAME`.",
                    elem_id="db_output_note",
                )


def _concept_controls(tab: Any) -> None:
    c = tab.controls
    with gr.Row(elem_classes="db-compact-row"):
        c["add_concept"] = gr.Button("Add concept", elem_id="db_add_concept", **SMALL)
        c["remove_concept"] = gr.Button("Remove concept", elem_id="db_remove_concept", **SMALL)
        c["concepts_import_path"] = gr.Textbox(
            label="concepts_list.json to import",
            lines=1,
            max_lines=1,
            elem_id="db_concepts_import_path",
            scale=3,
            min_width=240,
        )
        c["import_concepts"] = gr.Button("Import", elem_id="db_import_concepts", **SMALL)
        c["export_concepts"] = gr.Button("Export", elem_id="db_export_concepts", **SMALL)
    c["concepts_file"] = gr.File(label="Exported concepts_list.json", interactive=False, elem_id="db_concepts_file")
    c["concepts_message"] = gr.Markdown(elem_id="db_concepts_message")


def _saved_settings(tab: Any) -> None:
    c = tab.controls
    with gr.Row(equal_height=False, elem_classes="db-compact-row"):
        c["saved"] = gr.Dropdown(
            choices=tab.host.saved_settings(), label="Saved settings", elem_id="db_saved_settings", scale=2
        )
        c["load"] = gr.Button("Load settings", elem_id="db_load_settings", **SMALL)
        c["save"] = gr.Button("Save settings", elem_id="db_save_settings", **SMALL)
    c["settings_message"] = gr.Markdown(elem_id="db_settings_message")


def _run_panel(tab: Any) -> None:
    c = tab.controls
    with gr.Row():
        c["train"] = gr.Button("Train", variant="primary", elem_id="db_train", scale=2)
        c["cancel"] = gr.Button("Cancel", elem_id="db_cancel", scale=1)
        c["save_now"] = gr.Button("Save now", elem_id="db_save_now", scale=1)
        c["sample_now"] = gr.Button("Sample now", elem_id="db_sample_now", scale=1)
    c["memory_estimate"] = gr.Markdown(elem_id="db_memory_estimate")
    c["message"] = gr.Markdown(elem_id="db_message")
    c["status"] = gr.Markdown(elem_id="db_status")
    with gr.Row():
        c["plot"] = gr.LinePlot(
            x="step", y="loss", color="series", title="Loss", elem_id="db_loss_plot", width=420, height=240
        )
        c["samples"] = gr.Gallery(label="Samples", columns=4, elem_id="db_samples")
    with gr.Row(equal_height=False, elem_classes="db-compact-row"):
        c["checkpoints"] = gr.Dropdown(label="Checkpoints of this job", elem_id="db_checkpoints", scale=4)
        c["use_checkpoint"] = gr.Button("Use in txt2img", elem_id="db_use_checkpoint", **SMALL)
    c["switched"] = gr.Textbox(visible=False, elem_id="db_switched_checkpoint")  # read by SYNC_CHECKPOINT_JS
    c["lora_tag"] = gr.Textbox(visible=False, elem_id="db_lora_tag")  # read by ADD_TO_PROMPT_JS
    c["log"] = gr.Textbox(label="Log", lines=10, max_lines=10, interactive=False, elem_id="db_log")
    c["poll"] = gr.Button("Refresh progress", elem_id="db_poll")  # hidden by style.css, clicked by POLL_JS
    c["seen"] = gr.State({})
    with gr.Accordion("Several GPUs", open=False):
        gr.Markdown(
            "Training in the tab uses one device. To use several GPUs, save these settings (Setup panel: "
            "Save settings), then run from the extension's folder, with N the number of GPUs:  \n"
            f"`python -m dreambooth train --config {tab.host.settings_dir}/NAME.json --num-processes N`  \n"
            "(or `accelerate launch --multi_gpu --num_processes N -m dreambooth train --config ...`).",
            elem_id="db_several_gpus",
        )


def _wire(tab: Any, blocks: gr.Blocks) -> None:
    from .memory import MEMORY_FIELDS
    from .tab import PRESET_FIELDS

    c, widgets = tab.controls, tab.widgets
    editor = [tab.concept_widgets[s.name] for s in tab.concept_fields]
    concept = {c["concepts"], c["concept_index"], *editor}
    fill = [*widgets.values(), *editor, c["concepts"], c["concept_index"], c["settings_message"], c["architecture"]]
    model, resume = widgets["pretrained_model_name_or_path"], widgets["resume_from"]

    # Handlers that only move values around answer at once, outside gradio's queue: a queued event fails ("Error"
    # on every output) when a busy browser does not answer the queue's websocket within its 5 s.
    quick = {"queue": False}
    form, estimate = tab.form(), c["memory_estimate"]
    # The memory estimate: when a setting it depends on changes, and once the page is filled.  Outside the queue
    # too (seconds each, in a thread of their own): queued, it would hold up every other event.
    # First the estimate alone (one dry run), then what would fit (several).
    hidden = {"show_progress": "hidden", **quick}
    loaded = blocks.load(tab.initial, None, fill, **quick).then(tab.memory_estimate, form, estimate, **hidden)
    loaded.then(tab.memory_fit, form, estimate, **hidden)
    for name in MEMORY_FIELDS:
        if name in widgets:
            changed = widgets[name].change(tab.memory_estimate, form, estimate, **hidden)
            changed.then(tab.memory_fit, form, estimate, **hidden)
    c["load"].click(tab.load_settings, c["saved"], fill, **quick)
    c["save"].click(tab.save_settings, tab.form(), [c["settings_message"], c["saved"]], **quick)
    c["refresh_models"].click(tab.refresh_models, {model, resume}, [model, resume])
    model.change(tab.describe_model, model, c["architecture"])

    index = c["concept_index"]
    c["concept_index"].select(tab.select_concept, {c["concepts"], index}, editor, **quick)
    c["add_concept"].click(tab.add_concept, concept, [c["concepts"], index, *editor], **quick)
    c["remove_concept"].click(tab.remove_concept, {c["concepts"], index}, [c["concepts"], index, *editor], **quick)
    for widget in editor:
        widget.change(tab.edit_concept, concept, c["concepts"], **quick)
    prompts = {tab.concept_widgets["concept_instance_prompt"], tab.concept_widgets["concept_class_prompt"]}
    for widget in prompts:
        widget.change(tab.token_preview, prompts, c["token_preview"], **quick)
    c["import_concepts"].click(
        tab.import_concepts, c["concepts_import_path"], [c["concepts"], index, *editor, c["concepts_message"]], **quick
    )
    c["export_concepts"].click(tab.export_concepts, concept, [c["concepts_file"], c["concepts_message"]], **quick)
    c["check_dataset"].click(tab.check_dataset, tab.form(), [c["dataset_report"], c["thumbnails"]])
    c["low_memory_preset"].click(tab.low_memory_preset, None, [widgets[n] for n in PRESET_FIELDS], **quick)

    c["train"].click(tab.train, tab.form(), c["message"])
    for what, button in (("cancel", "cancel"), ("save", "save_now"), ("sample", "sample_now")):
        c[button].click(lambda w=what: tab.command(w), None, c["message"])
    used = c["use_checkpoint"].click(tab.use_checkpoint, c["checkpoints"], [c["message"], c["switched"], c["lora_tag"]])
    used.then(None, [c["switched"], c["lora_tag"]], None, _js=USE_IN_TXT2IMG_JS)
    # Progress: a browser timer clicks a hidden button while the Run panel is visible.  Not gradio's `every=`: a
    # server-side loop that makes the WebUI's "Reload UI" wait forever in Blocks.close().
    progress = [c["seen"], c["status"], c["plot"], c["samples"], c["log"], c["checkpoints"]]
    c["poll"].click(tab.poll, c["seen"], progress, show_progress="hidden", queue=False)
    blocks.load(tab.poll, c["seen"], progress, queue=False)
    blocks.load(None, None, None, _js=POLL_JS)
