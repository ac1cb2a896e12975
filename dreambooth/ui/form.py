"""The tab's form as plain data: which settings field sits in which panel, and values <-> settings.

No gradio here: the tab (:mod:`dreambooth.ui.tab`) builds one widget per :class:`FieldSpec`, named
``db_<field>`` (concept fields ``db_concept_<field>``), and passes their values back through
:func:`settings_from_values`.  Fields marked ``headless_only`` have no widget (the host decides them).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..settings import Concept, Settings

# The first screen: what a first run needs, in compact rows (``concept_*`` are the concept editor's fields).  The tab
# adds its controls to these rows: the model list's Refresh, the concept selector and "Check images", the
# low-memory preset.
FIRST_SCREEN_ROWS = (
    ("pretrained_model_name_or_path", "model_name"),
    ("concept_instance_data_dir", "concept_instance_prompt"),
    ("concept_class_prompt", "with_prior_preservation", "num_class_images"),
    ("max_train_steps", "learning_rate", "resolution", "train_batch_size"),
    ("save_model_every_n_steps", "n_save_sample", "low_memory"),
)
FIRST_SCREEN = frozenset(name for row in FIRST_SCREEN_ROWS for name in row)
# Everything else sits in closed accordions, in this order: (section, title).  A field's section is its schema
# group, except for the fields moved by SECTION_OF; a group not listed here (a new one) lands in "other".
SECTIONS = (
    ("concept", "This concept: class images, negative prompt, samples; more concepts"),
    ("images", "Images and captions"),
    ("dataset", "Aspect-ratio buckets and augmentation"),
    ("basics", "Epochs, accumulation and seed"),
    ("optimizer", "Learning rate schedule and optimiser"),
    ("loss", "Loss weighting and noise"),
    ("prior", "Prior preservation: class images"),
    ("memory", "Memory and speed"),
    ("text_encoder", "Text encoder"),
    ("network", "LoRA / LoHa / LoKr: train a small adapter, saved for the WebUI's Lora folder"),
    ("saving", "Saving and output format"),
    ("samples", "Samples and test images"),
    ("logging", "Logging"),
    ("model", "Separate VAE and resuming"),
    ("other", "Other settings"),
)
SECTION_OF = {
    "center_crop": "images",
    "hflip": "images",
    "use_txt_as_label": "images",
    "use_filename_as_label": "images",
    "caption_template": "images",
}
ROW_UNITS = 4  # a row holds four numbers / switches / choices, or two text fields
LIST_FIELDS = ("concepts",)  # edited by the concept editor, not by one widget


@dataclass(frozen=True)
class FieldSpec:
    """What a widget needs to know about one field."""

    name: str
    kind: str  # bool, int, float, choice, text
    label: str  # for people: the schema's ``label``, else the field name
    help: str
    default: Any
    optional: bool  # None allowed (an empty number box)
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...] | None

    @property
    def elem_id(self) -> str:
        return f"db_{self.name}"

    @property
    def key(self) -> str:
        """The settings key (the guide's parameter name), without the concept editor's prefix."""
        return self.name.removeprefix("concept_")

    @property
    def info(self) -> str:
        """The widget's help line: the help text, then the key that config files and the CLI use (unless the label
        is the key already)."""
        if self.label == self.key:
            return self.help
        return f"{self.help} [{self.key}]" if self.help else f"[{self.key}]"

    @property
    def is_wide(self) -> bool:
        """Free text (paths, prompts, names) needs twice the width of a number or a switch."""
        return self.kind == "text"


def _kind(annotation: Any, choices: Any) -> tuple[str, bool]:
    text = str(annotation)
    optional = "None" in text
    if choices:
        return "choice", optional
    for kind in ("bool", "int", "float"):
        if text.startswith(kind):
            return kind, optional
    return "text", optional


def _spec(field: dataclasses.Field, prefix: str = "") -> FieldSpec:
    meta = field.metadata
    kind, optional = _kind(field.type, meta.get("choices"))  # field.type is the annotation's text
    default = field.default if field.default is not dataclasses.MISSING else None
    return FieldSpec(
        name=prefix + field.name,
        kind=kind,
        label=meta.get("label") or field.name,
        help=meta.get("help", ""),
        default=default,
        optional=optional,
        minimum=meta.get("minimum"),
        maximum=meta.get("maximum"),
        choices=meta.get("choices"),
    )


def settings_specs() -> list[FieldSpec]:
    """One spec per settings field that has a widget (not the concept list, not headless-only fields)."""
    return [
        _spec(f)
        for f in dataclasses.fields(Settings)
        if f.name not in LIST_FIELDS and not f.metadata.get("headless_only")
    ]


def concept_specs() -> list[FieldSpec]:
    """The concept editor's fields, named ``concept_<field>``."""
    return [_spec(f, "concept_") for f in dataclasses.fields(Concept)]


def section_of(spec: FieldSpec) -> str:
    """The accordion of a field that is not on the first screen (see :data:`SECTIONS`)."""
    if spec.name.startswith("concept_"):
        return "concept"
    group = SECTION_OF.get(spec.name) or {f.name: f for f in dataclasses.fields(Settings)}[spec.name].metadata["group"]
    return group if group in dict(SECTIONS) else "other"


def rows(specs: list[FieldSpec]) -> list[list[FieldSpec]]:
    """``specs`` in declaration order, packed into rows of :data:`ROW_UNITS` (a text field counts twice)."""
    packed: list[list[FieldSpec]] = []
    used = ROW_UNITS
    for spec in specs:
        units = 2 if spec.is_wide else 1
        if used + units > ROW_UNITS:
            packed.append([])
            used = 0
        packed[-1].append(spec)
        used += units
    return packed


def _clean(spec: FieldSpec, value: Any) -> Any:
    """A widget's value as the settings expect it (empty number boxes are None; int boxes give ints)."""
    if spec.kind in ("int", "float"):
        if value is None or value == "":
            return None if spec.optional else spec.default
        if spec.kind == "int":
            number = float(value)
            return int(number) if number.is_integer() else number  # a fraction is reported by validation
        return float(value)
    if spec.kind == "bool":
        return bool(value)
    return "" if value is None else value


def settings_from_values(values: dict[str, Any], concepts: list[dict[str, Any]], base: Settings) -> Settings:
    """Settings from the widgets' values (keyed by field name) and the concept editor's list.

    ``base`` supplies the headless-only fields.  Problems of the values themselves (bounds, types) come back from
    :meth:`Settings.validate` / :meth:`Settings.from_dict` as sentences.
    """
    data = base.to_dict()
    for spec in settings_specs():
        if spec.name in values:
            data[spec.name] = _clean(spec, values[spec.name])
    specs = {s.name.removeprefix("concept_"): s for s in concept_specs()}
    data["concepts"] = [
        {name: _clean(specs[name], concept.get(name)) for name in specs if name in concept} for concept in concepts
    ]
    return Settings.from_dict(data)


def values_from_settings(settings: Settings) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The inverse: widget values and the concept list of a settings object."""
    values = {spec.name: getattr(settings, spec.name) for spec in settings_specs()}
    concepts = [dataclasses.asdict(c) for c in settings.concepts]
    return values, concepts


def empty_concept() -> dict[str, Any]:
    return dataclasses.asdict(Concept())
