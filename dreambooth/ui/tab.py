"""The DreamBooth tab (gradio 3.41): Setup, Run and Dataset tools.

The tab edits a settings object and nothing else: one widget per settings field (``elem_id`` ``db_<field>``, built
from the schema in :mod:`dreambooth.ui.form`), a concept editor over a list kept in the session, and buttons that
hand a finished :class:`~dreambooth.settings.Settings` to the :class:`~dreambooth.runner.Runner`.  Progress is
polled from the runner's snapshot once a second, so a reloaded page shows the running job again.

Every handler takes its inputs as one ``{component: value}`` dict (inputs given as a set) and returns one: nothing
is counted by position, so adding a widget cannot shift the others' values.  The layout is in
:mod:`dreambooth.ui.layout`.
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
from .form import concept_specs, empty_concept, settings_from_values, settings_specs, values_from_settings
from .memory import MemoryPanel
from .status import dataset_markdown, existing_files, plot_rows, status_markdown

MAX_THUMBNAILS = 24
PRESET_FIELDS = ("low_memory", "train_batch_size", "cache_latents", "optimizer")
MODEL_FIELD = "pretrained_model_name_or_path"


class Tab:
    """Builds the tab and holds the event handlers (methods, so tests can call them without a browser).

    ``widgets`` maps settings fields, ``concept_widgets`` the concept editor's fields (``concept_<field>``) and
    ``controls`` everything else (buttons, reports, the session's concept list) to their components.
    """

    def __init__(self, host: Host, runner: Runner):
        self.host, self.runner = host, runner
        self.specs = settings_specs()
        self.concept_fields = concept_specs()
        self.widgets: dict[str, Any] = {}
        self.concept_widgets: dict[str, Any] = {}
        self.controls: dict[str, Any] = {}
        self._descriptions: dict[tuple[str, int, int], str] = {}
        self.memory = MemoryPanel()

    # -------------------------------------------------------------------------------------- the form

    def _base(self) -> Settings:
        return Settings(output_dir=str(self.host.runs_dir))

    def form(self) -> set[Any]:
        """The inputs that make a settings object: every settings widget, the concept list, selector and editor."""
        return {
            *self.widgets.values(),
            *self.concept_widgets.values(),
            self.controls["concepts"],
            self.controls["concept_index"],
        }

    def gather(self, data: dict[Any, Any]) -> Settings:
        """Settings from the form's values (``{component: value}``, see :meth:`form`)."""
        values = {name: data[widget] for name, widget in self.widgets.items() if widget in data}
        if MODEL_FIELD in values:
            values[MODEL_FIELD] = self.model_path(values[MODEL_FIELD])
        return settings_from_values(values, self._concepts(data), self._base())

    def _edited(self, data: dict[Any, Any]) -> dict[str, Any]:
        """The concept editor's values, keyed by concept field."""
        return {s.key: data[self.concept_widgets[s.name]] for s in self.concept_fields}

    def _concepts(self, data: dict[Any, Any]) -> list[dict[str, Any]]:
        """The session's concept list with the editor's values stored into the selected concept."""
        concepts, index = data[self.controls["concepts"]], data[self.controls["concept_index"]]
        return self.store_concept(concepts, index, self._edited(data))

    @staticmethod
    def store_concept(concepts: list[dict[str, Any]], index: Any, edited: dict[str, Any]) -> list[dict[str, Any]]:
        concepts = [dict(c) for c in (concepts or [empty_concept()])]
        position = int(index or 1) - 1
        if 0 <= position < len(concepts):
            concepts[position].update(edited)
        return concepts

    def widget_values(self, settings: Settings) -> dict[Any, Any]:
        """What fills the form for ``settings``: every settings widget, the concept list, selector and editor."""
        values, concepts = values_from_settings(settings)
        values[MODEL_FIELD] = self.model_title(values[MODEL_FIELD])
        concepts = concepts or [empty_concept()]
        return {
            **{self.widgets[name]: value for name, value in values.items() if name in self.widgets},
            self.controls["concepts"]: concepts,
            self.controls["concept_index"]: gr.update(choices=self._concept_choices(concepts), value="1"),
            **self._editor_values(concepts[0]),
        }

    def _editor_values(self, concept: dict[str, Any]) -> dict[Any, Any]:
        return {self.concept_widgets[s.name]: concept.get(s.key) for s in self.concept_fields}

    @staticmethod
    def _concept_choices(concepts: list[dict[str, Any]]) -> list[str]:
        return [str(i) for i in range(1, len(concepts) + 1)]

    # -------------------------------------------------------------------------------------- base models

    def _listed(self, path: str) -> Any:
        """The checkpoint list's entry for the file ``path``, or None."""
        for choice in self.host.list_checkpoints() if path else ():
            if choice.path == path or Path(choice.path) == Path(path):
                return choice
        return None

    def model_title(self, path: str) -> str:
        """What the model list shows for ``path``: its checkpoint title (the WebUI's ``name [hash]``), else the
        path itself (a diffusers folder, a file elsewhere)."""
        listed = self._listed(path)
        return listed.title if listed else path or ""

    def model_path(self, value: str) -> str:
        """The file behind a title of the model list; anything else is taken as a path typed by the user."""
        for choice in self.host.list_checkpoints():
            if value == choice.title:
                return choice.path
        return value or ""

    def default_model(self) -> str | None:
        """The model loaded for generation now, else the first checkpoint found (a path)."""
        checkpoints = self.host.list_checkpoints()
        return self.host.loaded_checkpoint() or (checkpoints[0].path if checkpoints else None)

    def describe(self, path: str) -> str:
        """The architecture line for a model path (cached per file version: a .ckpt has to be read whole)."""
        if not path:
            return "Choose a base model."
        try:
            stat = Path(path).stat()
            key = (path, stat.st_mtime_ns, stat.st_size)
        except OSError:
            key = None
        if key in self._descriptions:
            return self._descriptions[key]
        try:
            from ..models.describe import describe_checkpoint

            refused = self.host.paths.check_read(path, "pretrained_model_name_or_path")
            if refused:
                raise DreamBoothError(refused)
            text = describe_checkpoint(path)
        except (DreamBoothError, OSError) as error:
            return f"**Cannot read this model:** {error}"
        if key is not None:
            self._descriptions = {key: text}  # one entry: the model on screen
        return text

    # -------------------------------------------------------------------------------------- handlers

    def initial(self) -> dict[Any, Any]:
        """What the form shows when the page (re)loads: the last used settings, else the defaults, and what the
        base model is."""
        settings = self.host.last_used()
        message = "The settings of the last training are back." if settings else "Default settings."
        settings = settings or self._base()
        if not settings.pretrained_model_name_or_path:
            settings.pretrained_model_name_or_path = self.default_model() or ""
        return {
            **self.widget_values(settings),
            self.controls["settings_message"]: message,
            self.controls["architecture"]: self.describe(settings.pretrained_model_name_or_path),
        }

    def train(self, data: dict[Any, Any]) -> dict[Any, Any]:
        message = self.controls["message"]
        try:
            entered = self.gather(data)
            settings = self.host.prepare(entered)
            # What comes back is what was entered: the run folder prepare() picks for an empty class folder would
            # otherwise be every later run's class folder (another subject's class images).
            self.host.remember_last_used(entered)
            self.runner.start(settings)
        except SettingsError as error:
            return {message: "**Cannot start:**\n" + "\n".join(f"- {p}" for p in error.problems)}
        except (RunnerBusy, DreamBoothError, ValueError) as error:
            return {message: f"**Cannot start:** {error}"}
        if getattr(settings, "training_method", "full") != "full":
            return {message: f"Started **{settings.model_name}**; LoRA files go to `{settings.lora_dir}`."}
        return {message: f"Started **{settings.model_name}**; checkpoints go to `{settings.checkpoint_dir}`."}

    def command(self, what: str) -> dict[Any, Any]:
        done = {"cancel": self.runner.cancel, "save": self.runner.save_now, "sample": self.runner.sample_now}[what]()
        text = {
            "cancel": "Cancel requested: the job stops after this step and saves a resumable state.",
            "save": "A checkpoint will be saved after this step.",
            "sample": "Samples will be made after this step.",
        }[what]
        return {self.controls["message"]: text if done else "No training is running."}

    def save_settings(self, data: dict[Any, Any]) -> dict[Any, Any]:
        message = self.controls["settings_message"]
        try:
            path = self.host.save_settings(self.gather(data))  # as entered, like the last Train's (see train)
        except (SettingsError, ValueError) as error:
            return {message: f"**Not saved:** {error}"}
        return {message: f"Saved `{path}`.", self.controls["saved"]: gr.update(choices=self.host.saved_settings())}

    def load_settings(self, name: str) -> dict[Any, Any]:
        message = self.controls["settings_message"]
        if not name:
            return {message: "Choose saved settings."}
        try:
            settings = self.host.load_settings(name)
        except (OSError, DreamBoothError) as error:
            return {message: f"**Not loaded:** {error}"}  # the form stays as it is
        return {
            **self.widget_values(settings),
            message: f"Loaded '{name}'.",
            self.controls["architecture"]: self.describe(settings.pretrained_model_name_or_path),
        }

    def describe_model(self, value: str) -> dict[Any, Any]:
        return {self.controls["architecture"]: self.describe(self.model_path(value))}

    def refresh_models(self, data: dict[Any, Any]) -> dict[Any, Any]:
        """Re-read the checkpoint list and the resumable training states."""
        self.host.refresh_checkpoints()
        model, resume = self.widgets[MODEL_FIELD], self.widgets["resume_from"]
        return {
            model: gr.update(choices=[c.title for c in self.host.list_checkpoints()], value=data[model]),
            resume: gr.update(choices=["", *self.host.saved_states()], value=data[resume]),
        }

    # concept editor
    def select_concept(self, data: dict[Any, Any]) -> dict[Any, Any]:
        concepts = data[self.controls["concepts"]] or [empty_concept()]
        position = min(max(int(data[self.controls["concept_index"]] or 1), 1), len(concepts)) - 1
        return self._editor_values(concepts[position])

    def add_concept(self, data: dict[Any, Any]) -> dict[Any, Any]:
        concepts = [*self._concepts(data), empty_concept()]
        choices = self._concept_choices(concepts)
        return {
            self.controls["concepts"]: concepts,
            self.controls["concept_index"]: gr.update(choices=choices, value=choices[-1]),
            **self._editor_values(concepts[-1]),
        }

    def remove_concept(self, data: dict[Any, Any]) -> dict[Any, Any]:
        concepts = [dict(c) for c in (data[self.controls["concepts"]] or [])]
        position = int(data[self.controls["concept_index"]] or 1) - 1
        if 0 <= position < len(concepts):
            del concepts[position]
        concepts = concepts or [empty_concept()]
        return {
            self.controls["concepts"]: concepts,
            self.controls["concept_index"]: gr.update(choices=self._concept_choices(concepts), value="1"),
            **self._editor_values(concepts[0]),
        }

    def edit_concept(self, data: dict[Any, Any]) -> dict[Any, Any]:
        return {self.controls["concepts"]: self._concepts(data)}

    def import_concepts(self, path: str) -> dict[Any, Any]:
        message = self.controls["concepts_message"]
        try:
            refused = self.host.paths.check_read(path, "concepts_list.json") if path else ""
            if refused:
                raise DreamBoothError(refused)
            if not path or not Path(path).is_file():
                raise DreamBoothError(f"'{path}': no such concepts_list.json file")
            concepts = [dataclasses.asdict(c) for c in concepts_from_list(path)]
        except (DreamBoothError, OSError, ValueError) as error:
            return {message: f"**Not imported:** {error}"}
        return {
            self.controls["concepts"]: concepts,
            self.controls["concept_index"]: gr.update(choices=self._concept_choices(concepts), value="1"),
            **self._editor_values(concepts[0]),
            message: f"Imported {len(concepts)} concept(s) from `{path}`.",
        }

    def export_concepts(self, data: dict[Any, Any]) -> dict[Any, Any]:
        concepts = self._concepts(data)
        path = self.host.data_dir / "concepts_list.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        from ..models.files import atomic_path

        with atomic_path(path) as temp:
            temp.write_text(json.dumps(concepts, indent=2), encoding="utf-8")
        return {
            self.controls["concepts_file"]: str(path),
            self.controls["concepts_message"]: f"Exported {len(concepts)} concept(s) to `{path}`.",
        }

    def token_preview(self, data: dict[Any, Any]) -> dict[Any, Any]:
        from ..tokens import identifier_report

        instance = data[self.concept_widgets["concept_instance_prompt"]] or ""
        klass = data[self.concept_widgets["concept_class_prompt"]] or ""
        return {self.controls["token_preview"]: identifier_report(instance, klass)}

    def check_dataset(self, data: dict[Any, Any]) -> dict[Any, Any]:
        """Per concept: image count and unusable files; thumbnails of the selected concept; with aspect-ratio
        buckets on, how many images go to each bucket."""
        from ..data.buckets import oriented_size
        from ..data.images import check_images, list_images

        concepts = self._concepts(data)
        index = data[self.controls["concept_index"]]
        resolution = data[self.widgets["resolution"]]
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
        if data[self.widgets["use_aspect_ratio_bucket"]] and usable:
            sides = [data[self.widgets[n]] for n in ("aspect_buckets", "bucket_min_side", "bucket_max_side")]
            text += "\n\n" + self._bucket_table(usable, resolution, *sides)
        return {
            self.controls["dataset_report"]: text,
            self.controls["thumbnails"]: gr.update(value=thumbnails, visible=bool(thumbnails)),
        }

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

    def low_memory_preset(self) -> dict[Any, Any]:
        """The switch, batch 1, cached latents, and 8-bit Adam when bitsandbytes is installed."""
        import importlib.util

        values = {"low_memory": True, "train_batch_size": 1, "cache_latents": True}
        if importlib.util.find_spec("bitsandbytes") is not None:
            values["optimizer"] = "adamw_8bit"
        return {self.widgets[name]: value for name, value in values.items()}

    def memory_estimate(self, data: dict[Any, Any]) -> dict[Any, Any]:
        """The memory estimate beside Train for the form's settings, alone (:mod:`dreambooth.ui.memory`)."""
        return self._memory(data, quick=True)

    def memory_fit(self, data: dict[Any, Any]) -> dict[Any, Any]:
        """Then with what would fit the GPU, or what Fit my GPU turns on (a search of several dry runs)."""
        return self._memory(data, quick=False)

    def _memory(self, data: dict[Any, Any], quick: bool) -> dict[Any, Any]:
        panel = self.controls["memory_estimate"]
        try:
            settings = self.gather(data)
        except SettingsError as error:
            problems = "\n".join(f"- {p}" for p in error.problems)
            return {panel: f"**No memory estimate** until this is fixed:\n{problems}"}
        path = settings.pretrained_model_name_or_path
        refused = self.host.paths.check_read(path, MODEL_FIELD) if path else ""
        if refused:
            return {panel: f"**No memory estimate:** {refused}"}
        text = self.memory.markdown(settings, quick=quick)  # None: a newer edit superseded this one
        return {panel: gr.update() if text is None else text}

    def use_checkpoint(self, path: str) -> dict[Any, Any]:
        """Switch txt2img to ``path``.  On success the checkpoint's title goes to ``switched``, from where the
        page's script brings the WebUI's own checkpoint dropdown up to date (:data:`layout.SYNC_CHECKPOINT_JS`).

        For a LoRA file: switch to the base model it was trained on, and put ``<lora:NAME:1>`` into ``lora_tag``,
        from where the page's script adds it to the txt2img prompt (:data:`layout.ADD_TO_PROMPT_JS`)."""
        message, switched, tag = self.controls["message"], self.controls["switched"], self.controls["lora_tag"]
        if not path:
            return {message: "No checkpoint yet.", switched: "", tag: ""}
        if self.host.is_network_file(path):
            done, text, lora_tag, base = self.host.use_network(path)
            if not done:
                return {message: f"**Not used:** {text}", switched: "", tag: ""}
            listed = self._listed(base)
            return {message: text, switched: listed.title if listed else "", tag: lora_tag}
        done, text = self.host.use_checkpoint(path)
        if not done:
            return {message: f"**Not switched:** {text}", switched: "", tag: ""}
        listed = self._listed(path)
        return {message: text, switched: listed.title if listed else "", tag: ""}

    def poll(self, seen: dict[str, Any]) -> dict[Any, Any]:
        """Progress for the Run panel; outputs that did not change are left out (no gallery flicker).  Files
        that vanished since the job wrote them (a run folder deleted by hand) are left out too."""
        import pandas as pd

        snapshot = self.runner.snapshot()
        job = snapshot.job_id
        now = {  # what identifies each output's content; an unchanged one is not sent again
            "losses": (job, len(snapshot.losses), len(snapshot.validation_losses)),
            "samples": (job, len(snapshot.samples)),
            "log": (job, len(snapshot.log), snapshot.log[-1:]),
            "checkpoints": (job, len(snapshot.checkpoints)),
        }
        changed = {name: (seen or {}).get(name) != value for name, value in now.items()}
        c = self.controls
        outputs: dict[Any, Any] = {c["seen"]: now, c["status"]: status_markdown(snapshot)}
        if changed["losses"]:
            rows = plot_rows(snapshot) or [(0, 0.0, "training")]  # training and validation loss, two series
            outputs[c["plot"]] = gr.update(value=pd.DataFrame(rows, columns=["step", "loss", "series"]))
        if changed["samples"]:
            outputs[c["samples"]] = gr.update(value=list(reversed(existing_files(snapshot.samples))))
        if changed["log"]:
            outputs[c["log"]] = "\n".join(snapshot.log)
        if changed["checkpoints"]:
            checkpoints = existing_files(snapshot.checkpoints)
            outputs[c["checkpoints"]] = gr.update(choices=checkpoints, value=checkpoints[-1] if checkpoints else None)
        return outputs

    # -------------------------------------------------------------------------------------- layout

    def build(self, css: str | None = None) -> gr.Blocks:
        from .layout import build_layout

        return build_layout(self, css)


def build_tab(host: Host, runner: Runner, css: str | None = None) -> tuple[gr.Blocks, Tab]:
    tab = Tab(host, runner)
    return tab.build(css=css), tab
