"""The DreamBooth tab (gradio 3.41): Model, Concepts, Dataset, Parameters, Run.

The tab edits a settings object and nothing else: one widget per settings field (``elem_id`` ``db_<field>``, built
from the schema in :mod:`dreambooth.ui.form`), a concept editor over a list kept in the session, and buttons that
hand a finished :class:`~dreambooth.settings.Settings` to the :class:`~dreambooth.runner.Runner`.  Progress is
polled from the runner's snapshot once a second, so a reloaded page shows the running job again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import gradio as gr

from ..errors import DreamBoothError
from ..host import Host
from ..runner import Runner, RunnerBusy
from ..settings import Settings, SettingsError, concepts_from_list
from .form import (
    PARAMETER_GROUPS,
    FieldSpec,
    concept_specs,
    empty_concept,
    panel_of,
    settings_from_values,
    settings_specs,
    values_from_settings,
)
from .status import dataset_markdown, loss_points, status_markdown

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
MAX_THUMBNAILS = 24
PRESET_FIELDS = ("low_memory", "train_batch_size", "cache_latents", "optimizer")


def _widget(spec: FieldSpec, value: Any = None) -> Any:
    value = spec.default if value is None else value
    common = {"label": spec.label, "info": spec.help, "elem_id": spec.elem_id}
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=list(spec.choices or ()), value=value, **common)
    if spec.kind in ("int", "float"):
        return gr.Number(
            value=value,
            precision=0 if spec.kind == "int" else None,
            minimum=spec.minimum,
            maximum=spec.maximum,
            **common,
        )
    return gr.Textbox(value=value, lines=1, **common)


class Tab:
    """Builds the tab and holds the event handlers (methods, so tests can call them without a browser)."""

    def __init__(self, host: Host, runner: Runner):
        self.host, self.runner = host, runner
        self.specs = settings_specs()
        self.concept_fields = concept_specs()
        self.widgets: dict[str, Any] = {}
        self.concept_widgets: dict[str, Any] = {}

    # -------------------------------------------------------------------------------------- settings

    def _base(self) -> Settings:
        return Settings(output_dir=str(self.host.runs_dir))

    def gather(self, args: tuple[Any, ...]) -> Settings:
        """Settings from the event inputs: every settings widget, the concept list, the selected index, the editor."""
        count = len(self.specs)
        values = dict(zip((s.name for s in self.specs), args[:count]))
        concepts, index = args[count], args[count + 1]
        edited = dict(zip((s.name.removeprefix("concept_") for s in self.concept_fields), args[count + 2 :]))
        concepts = self.store_concept(concepts, index, edited)
        return settings_from_values(values, concepts, self._base())

    @staticmethod
    def store_concept(concepts: list[dict[str, Any]], index: Any, edited: dict[str, Any]) -> list[dict[str, Any]]:
        concepts = [dict(c) for c in (concepts or [empty_concept()])]
        position = int(index or 1) - 1
        if 0 <= position < len(concepts):
            concepts[position].update(edited)
        return concepts

    def widget_values(self, settings: Settings) -> list[Any]:
        """Outputs that fill the form: every settings widget, the concept list, the selector, the editor."""
        values, concepts = values_from_settings(settings)
        concepts = concepts or [empty_concept()]
        return [
            *(values[s.name] for s in self.specs),
            concepts,
            gr.update(choices=self._concept_choices(concepts), value="1"),
            *self._editor_values(concepts[0]),
        ]

    def _editor_values(self, concept: dict[str, Any]) -> list[Any]:
        return [concept.get(s.name.removeprefix("concept_")) for s in self.concept_fields]

    @staticmethod
    def _concept_choices(concepts: list[dict[str, Any]]) -> list[str]:
        return [str(i) for i in range(1, len(concepts) + 1)]

    def initial(self) -> list[Any]:
        """What the form shows when the page (re)loads: the last used settings, else the defaults."""
        settings = self.host.last_used()
        message = "The settings of the last training are back." if settings else "Default settings."
        settings = settings or self._base()
        if not settings.pretrained_model_name_or_path:
            settings.pretrained_model_name_or_path = self.default_model() or ""
        return [*self.widget_values(settings), message]

    def default_model(self) -> str | None:
        """The model loaded for generation now, else the first checkpoint found."""
        checkpoints = self.host.list_checkpoints()
        return self.host.loaded_checkpoint() or (checkpoints[0].path if checkpoints else None)

    # -------------------------------------------------------------------------------------- handlers

    def train(self, *args: Any) -> str:
        try:
            settings = self.host.prepare(self.gather(args))
            self.host.remember_last_used(settings)
            self.runner.start(settings)
        except SettingsError as error:
            return "**Cannot start:**\n" + "\n".join(f"- {p}" for p in error.problems)
        except (RunnerBusy, DreamBoothError, ValueError) as error:
            return f"**Cannot start:** {error}"
        return f"Started **{settings.model_name}**; checkpoints go to `{settings.checkpoint_dir}`."

    def command(self, what: str) -> str:
        done = {"cancel": self.runner.cancel, "save": self.runner.save_now, "sample": self.runner.sample_now}[what]()
        if not done:
            return "No training is running."
        return {
            "cancel": "Cancel requested: the job stops after this step and saves a resumable state.",
            "save": "A checkpoint will be saved after this step.",
            "sample": "Samples will be made after this step.",
        }[what]

    def save_settings(self, *args: Any) -> tuple[str, Any]:
        try:
            path = self.host.save_settings(self.host.prepare(self.gather(args)))
        except (SettingsError, ValueError) as error:
            return f"**Not saved:** {error}", gr.update()
        return f"Saved `{path}`.", gr.update(choices=self.host.saved_settings())

    def load_settings(self, name: str) -> list[Any]:
        unchanged = [gr.update()] * (len(self.specs) + 3 + len(self.concept_fields))  # the form as it is
        if not name:
            return [*unchanged, "Choose saved settings."]
        try:
            settings = self.host.load_settings(name)
        except (OSError, DreamBoothError) as error:
            return [*unchanged, f"**Not loaded:** {error}"]
        return [*self.widget_values(settings), f"Loaded '{name}'."]

    def describe_model(self, path: str) -> str:
        if not path:
            return "Choose a base model."
        try:
            from ..models.describe import describe_checkpoint

            refused = self.host.paths.check_read(path, "pretrained_model_name_or_path")
            if refused:
                raise DreamBoothError(refused)
            return describe_checkpoint(path)
        except (DreamBoothError, OSError) as error:
            return f"**Cannot read this model:** {error}"

    def refresh_models(self, current: str, resume: str) -> tuple[Any, Any]:
        """Re-read the checkpoint list and the resumable training states."""
        self.host.refresh_checkpoints()
        return (
            gr.update(choices=[c.path for c in self.host.list_checkpoints()], value=current),
            gr.update(choices=["", *self.host.saved_states()], value=resume),
        )

    # concept editor
    def select_concept(self, concepts: list[dict[str, Any]], index: str) -> list[Any]:
        concepts = concepts or [empty_concept()]
        position = min(max(int(index or 1), 1), len(concepts)) - 1
        return self._editor_values(concepts[position])

    def add_concept(self, concepts: list[dict[str, Any]], index: str, *edited: Any) -> list[Any]:
        concepts = self.store_concept(concepts, index, self._edited(edited))
        concepts.append(empty_concept())
        choices = self._concept_choices(concepts)
        return [concepts, gr.update(choices=choices, value=choices[-1]), *self._editor_values(concepts[-1])]

    def remove_concept(self, concepts: list[dict[str, Any]], index: str) -> list[Any]:
        concepts = [dict(c) for c in (concepts or [])]
        position = int(index or 1) - 1
        if 0 <= position < len(concepts):
            del concepts[position]
        concepts = concepts or [empty_concept()]
        choices = self._concept_choices(concepts)
        return [concepts, gr.update(choices=choices, value="1"), *self._editor_values(concepts[0])]

    def _edited(self, edited: tuple[Any, ...]) -> dict[str, Any]:
        return dict(zip((s.name.removeprefix("concept_") for s in self.concept_fields), edited))

    def edit_concept(self, concepts: list[dict[str, Any]], index: str, *edited: Any) -> list[dict[str, Any]]:
        return self.store_concept(concepts, index, self._edited(edited))

    def import_concepts(self, path: str) -> list[Any]:
        try:
            refused = self.host.paths.check_read(path, "concepts_list.json") if path else ""
            if refused:
                raise DreamBoothError(refused)
            if not path or not Path(path).is_file():
                raise DreamBoothError(f"'{path}': no such concepts_list.json file")
            concepts = [dataclasses.asdict(c) for c in concepts_from_list(path)]
        except (DreamBoothError, OSError, ValueError) as error:
            return [gr.update(), gr.update(), *[gr.update()] * len(self.concept_fields), f"**Not imported:** {error}"]
        choices = self._concept_choices(concepts)
        message = f"Imported {len(concepts)} concept(s) from `{path}`."
        return [concepts, gr.update(choices=choices, value="1"), *self._editor_values(concepts[0]), message]

    def export_concepts(self, concepts: list[dict[str, Any]], index: str, *edited: Any) -> tuple[Any, str]:
        concepts = self.store_concept(concepts, index, self._edited(edited))
        path = self.host.data_dir / "concepts_list.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        from ..models.files import atomic_path

        with atomic_path(path) as temp:
            temp.write_text(json.dumps(concepts, indent=2), encoding="utf-8")
        return str(path), f"Exported {len(concepts)} concept(s) to `{path}`."

    def token_preview(self, instance_prompt: str, class_prompt: str) -> str:
        from ..tokens import identifier_report

        return identifier_report(instance_prompt or "", class_prompt or "")

    def check_dataset(
        self,
        concepts: list[dict[str, Any]],
        index: str,
        resolution: Any,
        use_buckets: bool,
        bucket_list: str,
        min_side: Any,
        max_side: Any,
        *edited: Any,
    ) -> tuple:
        """Per concept: image count and unusable files; thumbnails of the selected concept; with aspect-ratio
        buckets on, how many images go to each bucket."""
        from ..data.buckets import oriented_size
        from ..data.images import check_images, list_images

        concepts = self.store_concept(concepts, index, self._edited(edited))
        policy = self.host.paths
        reports, thumbnails, usable = [], [], []
        minimum = int(resolution or 0)
        for number, concept in enumerate(concepts, start=1):
            folder = concept.get("instance_data_dir") or ""
            if not folder:
                continue
            refused = policy.check_read(folder, "instance_data_dir")
            if refused:
                reports.append((number, folder, 0, [(Path(folder), refused)]))
                continue
            try:
                paths = list_images(folder)
            except DreamBoothError as error:
                reports.append((number, folder, 0, [(Path(folder), str(error))]))
                continue
            problems = [(p.path, p.reason) for p in check_images(paths)]
            bad = {p for p, _ in problems}
            for path in paths:  # usable, but upscaled: worth knowing, not an error
                if path not in bad and min(oriented_size(path)) < minimum:
                    width, height = oriented_size(path)
                    problems.append((path, f"small ({width}x{height}): it is upscaled to reach {minimum} px"))
            reports.append((number, folder, len(paths), problems))
            usable.extend(p for p in paths if p not in bad)
            if number == int(index or 1):
                thumbnails = [str(p) for p in paths if p not in bad][:MAX_THUMBNAILS]
        text = dataset_markdown(reports)
        if use_buckets and usable:
            text += "\n\n" + self._bucket_table(usable, resolution, bucket_list, min_side, max_side)
        return text, thumbnails

    @staticmethod
    def _bucket_table(paths: list[Path], resolution: Any, bucket_list: str, min_side: Any, max_side: Any) -> str:
        from ..data.buckets import assign_buckets, bucket_report, generate_buckets, parse_buckets

        try:
            if (bucket_list or "").strip():
                buckets = parse_buckets(bucket_list)
            else:
                buckets = generate_buckets(int(resolution), int(min_side or 0) or None, int(max_side or 0) or None)
        except ValueError as error:
            return f"**Aspect-ratio buckets:** {error}"
        counts = bucket_report(assign_buckets(paths, buckets))["counts"]
        rows = "\n".join(f"| {bucket} | {count} |" for bucket, count in counts.items())
        return f"| bucket | images |\n|---|---|\n{rows}"

    @staticmethod
    def low_memory_preset() -> list[Any]:
        """Values for :data:`PRESET_FIELDS`: the switch, batch 1, cached latents, 8-bit Adam when installed."""
        import importlib.util

        has_bnb = importlib.util.find_spec("bitsandbytes") is not None
        return [True, 1, True, "adamw_8bit" if has_bnb else gr.update()]

    def use_checkpoint(self, path: str) -> str:
        if not path:
            return "No checkpoint yet."
        done, message = self.host.use_checkpoint(path)
        return message if done else f"**Not switched:** {message}"

    def poll(self, seen: dict[str, Any]) -> list[Any]:
        """Progress for the Run panel; outputs that did not change are left alone (no gallery flicker)."""
        import pandas as pd

        snapshot = self.runner.snapshot()
        job = snapshot.job_id
        now = {  # what identifies each output's content; an unchanged one is not sent again
            "losses": (job, len(snapshot.losses)),
            "samples": (job, len(snapshot.samples)),
            "log": (job, len(snapshot.log), snapshot.log[-1:]),
            "checkpoints": (job, len(snapshot.checkpoints)),
        }
        changed = {name: (seen or {}).get(name) != value for name, value in now.items()}
        last = snapshot.checkpoints[-1] if snapshot.checkpoints else None
        outputs: list[Any] = [
            status_markdown(snapshot),
            gr.update(value=pd.DataFrame(loss_points(snapshot) or [(0, 0.0)], columns=["step", "loss"]))
            if changed["losses"]
            else gr.update(),
            gr.update(value=list(reversed(snapshot.samples))) if changed["samples"] else gr.update(),
            "\n".join(snapshot.log) if changed["log"] else gr.update(),
            gr.update(choices=list(snapshot.checkpoints), value=last) if changed["checkpoints"] else gr.update(),
        ]
        seen = now
        return [seen, *outputs]

    # -------------------------------------------------------------------------------------- layout

    def build(self, css: str | None = None) -> gr.Blocks:
        with gr.Blocks(analytics_enabled=False, elem_id="dreambooth_tab", css=css, title="DreamBooth") as blocks:
            notes = self.host.environment_notes()
            if notes:
                gr.Markdown("\n".join(f"- {n}" for n in notes), elem_id="db_environment")
            by_panel: dict[str, list[FieldSpec]] = {}
            for spec in self.specs:
                by_panel.setdefault(panel_of(spec), []).append(spec)
            concepts_state = gr.State([empty_concept()])

            with gr.Tab("Model", elem_id="db_panel_model"):
                self._model_panel(by_panel["model"])
            with gr.Tab("Concepts", elem_id="db_panel_concepts"):
                concept_index = self._concepts_panel(concepts_state)
            with gr.Tab("Dataset", elem_id="db_panel_dataset"):
                for spec in by_panel["dataset"]:
                    self.widgets[spec.name] = _widget(spec)
                check = gr.Button("Check images", elem_id="db_check_dataset")
                dataset_report = gr.Markdown(elem_id="db_dataset_report")
                thumbnails = gr.Gallery(label="Images of the selected concept", columns=6, elem_id="db_thumbnails")
            with gr.Tab("Dataset tools", elem_id="db_panel_tools"):
                from .tools import DatasetTools

                DatasetTools(self.host).build()
            with gr.Tab("Parameters", elem_id="db_panel_parameters"):
                preset = gr.Button("Low-memory preset", elem_id="db_low_memory_preset")
                for group, title in PARAMETER_GROUPS:
                    specs = by_panel.get(group, [])
                    if not specs:
                        continue
                    with gr.Accordion(title, open=group == "basics", elem_id=f"db_group_{group}"):
                        for spec in specs:
                            self.widgets[spec.name] = _widget(spec)
            with gr.Tab("Run", elem_id="db_panel_run"):
                run = self._run_panel()

            # ---- wiring
            editor = [self.concept_widgets[s.name] for s in self.concept_fields]
            form = [*(self.widgets[s.name] for s in self.specs), concepts_state, concept_index, *editor]
            fill = [*(self.widgets[s.name] for s in self.specs), concepts_state, concept_index, *editor]
            blocks.load(self.initial, None, [*fill, self.model_controls["settings_message"]])
            bucket_inputs = [
                self.widgets[name]
                for name in (
                    "resolution",
                    "use_aspect_ratio_bucket",
                    "aspect_buckets",
                    "bucket_min_side",
                    "bucket_max_side",
                )
            ]
            check.click(
                self.check_dataset,
                [concepts_state, concept_index, *bucket_inputs, *editor],
                [dataset_report, thumbnails],
            )
            preset.click(self.low_memory_preset, None, [self.widgets[n] for n in PRESET_FIELDS])
            run["train"].click(self.train, form, run["message"])
            for what in ("cancel", "save", "sample"):
                run[what].click(lambda w=what: self.command(w), None, run["message"])
            run["use"].click(self.use_checkpoint, run["checkpoints"], run["message"])
            self.model_controls["save"].click(
                self.save_settings, form, [self.model_controls["settings_message"], self.model_controls["saved"]]
            )
            self.model_controls["load"].click(
                self.load_settings, self.model_controls["saved"], [*fill, self.model_controls["settings_message"]]
            )
            # Progress: a browser timer clicks a hidden button while the Run panel is visible.  Not gradio's
            # `every=`: a server-side loop that makes the WebUI's "Reload UI" wait forever in Blocks.close().
            seen = gr.State({})
            outputs = [seen, run["status"], run["plot"], run["samples"], run["log"], run["checkpoints"]]
            run["poll"].click(self.poll, seen, outputs, show_progress="hidden", queue=False)
            blocks.load(self.poll, seen, outputs, queue=False)
            blocks.load(None, None, None, _js=POLL_JS)
        return blocks

    def _model_panel(self, specs: list[FieldSpec]) -> None:
        checkpoints = [c.path for c in self.host.list_checkpoints()]
        controls: dict[str, Any] = {}
        with gr.Row():
            spec = next(s for s in specs if s.name == "pretrained_model_name_or_path")
            model = gr.Dropdown(
                choices=checkpoints,
                value=self.default_model(),
                allow_custom_value=True,
                label=spec.label,
                info=spec.help,
                elem_id=spec.elem_id,
                scale=4,
            )
            self.widgets[spec.name] = model
            refresh = gr.Button("Refresh", elem_id="db_refresh_models", scale=1)
        architecture = gr.Markdown(elem_id="db_architecture")
        for spec in specs:
            if spec.name == "resume_from":
                self.widgets[spec.name] = gr.Dropdown(
                    choices=["", *self.host.saved_states()],
                    value="",
                    allow_custom_value=True,
                    label=spec.label,
                    info=spec.help,
                    elem_id=spec.elem_id,
                )
            elif spec.name != "pretrained_model_name_or_path":
                self.widgets[spec.name] = _widget(spec)
        gr.Markdown(
            f"Checkpoints are written to `{self.host.checkpoint_dir}`; samples, logs and the training state to "
            f"`{self.host.runs_dir}/NAME`.",
            elem_id="db_output_note",
        )
        with gr.Row():
            controls["saved"] = gr.Dropdown(
                choices=self.host.saved_settings(), label="Saved settings", elem_id="db_saved_settings", scale=3
            )
            controls["load"] = gr.Button("Load settings", elem_id="db_load_settings", scale=1)
            controls["save"] = gr.Button("Save settings", elem_id="db_save_settings", scale=1)
        controls["settings_message"] = gr.Markdown(elem_id="db_settings_message")
        resume = self.widgets["resume_from"]
        refresh.click(self.refresh_models, [model, resume], [model, resume])
        model.change(self.describe_model, model, architecture)
        self.model_controls = controls

    def _concepts_panel(self, concepts_state: Any) -> Any:
        with gr.Row():
            index = gr.Dropdown(choices=["1"], value="1", label="Concept", elem_id="db_concept_index", scale=2)
            add = gr.Button("Add concept", elem_id="db_add_concept", scale=1)
            remove = gr.Button("Remove concept", elem_id="db_remove_concept", scale=1)
        for spec in self.concept_fields:
            self.concept_widgets[spec.name] = _widget(spec)
            if spec.name == "concept_instance_prompt":
                preview = gr.Markdown(elem_id="db_token_preview")
        with gr.Row():
            path = gr.Textbox(label="concepts_list.json to import", elem_id="db_concepts_import_path", scale=4)
            do_import = gr.Button("Import", elem_id="db_import_concepts", scale=1)
            do_export = gr.Button("Export", elem_id="db_export_concepts", scale=1)
        exported = gr.File(label="Exported concepts_list.json", interactive=False, elem_id="db_concepts_file")
        message = gr.Markdown(elem_id="db_concepts_message")

        editor = [self.concept_widgets[s.name] for s in self.concept_fields]
        index.select(self.select_concept, [concepts_state, index], editor)
        add.click(self.add_concept, [concepts_state, index, *editor], [concepts_state, index, *editor])
        remove.click(self.remove_concept, [concepts_state, index], [concepts_state, index, *editor])
        for widget in editor:
            widget.change(self.edit_concept, [concepts_state, index, *editor], concepts_state)
        prompts = [self.concept_widgets["concept_instance_prompt"], self.concept_widgets["concept_class_prompt"]]
        for widget in prompts:
            widget.change(self.token_preview, prompts, preview)
        do_import.click(self.import_concepts, path, [concepts_state, index, *editor, message])
        do_export.click(self.export_concepts, [concepts_state, index, *editor], [exported, message])
        return index

    def _run_panel(self) -> dict[str, Any]:
        run: dict[str, Any] = {}
        with gr.Row():
            run["train"] = gr.Button("Train", variant="primary", elem_id="db_train")
            run["cancel"] = gr.Button("Cancel", elem_id="db_cancel")
            run["save"] = gr.Button("Save now", elem_id="db_save_now")
            run["sample"] = gr.Button("Sample now", elem_id="db_sample_now")
        run["message"] = gr.Markdown(elem_id="db_message")
        run["status"] = gr.Markdown(elem_id="db_status")
        with gr.Row():
            run["plot"] = gr.LinePlot(x="step", y="loss", title="Loss", elem_id="db_loss_plot", width=420, height=240)
            run["samples"] = gr.Gallery(label="Samples", columns=4, elem_id="db_samples")
        with gr.Row():
            run["checkpoints"] = gr.Dropdown(label="Checkpoints of this job", elem_id="db_checkpoints", scale=4)
            run["use"] = gr.Button("Use in txt2img", elem_id="db_use_checkpoint", scale=1)
        run["log"] = gr.Textbox(label="Log", lines=10, max_lines=10, interactive=False, elem_id="db_log")
        run["poll"] = gr.Button("Refresh progress", elem_id="db_poll")  # hidden by style.css, clicked by POLL_JS
        with gr.Accordion("Several GPUs", open=False):
            gr.Markdown(
                "Training in the tab uses one device. To use several GPUs, save these settings (Model panel: "
                "Save settings), then run from the extension's folder, with N the number of GPUs:  \n"
                f"`python -m dreambooth train --config {self.host.settings_dir}/NAME.json --num-processes N`  \n"
                "(or `accelerate launch --multi_gpu --num_processes N -m dreambooth train --config ...`).",
                elem_id="db_several_gpus",
            )
        return run


def build_tab(host: Host, runner: Runner, css: str | None = None) -> tuple[gr.Blocks, Tab]:
    tab = Tab(host, runner)
    return tab.build(css=css), tab
