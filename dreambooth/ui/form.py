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

# Which panel shows which field; fields not listed go to Parameters under their schema group.
MODEL_FIELDS = (
    "pretrained_model_name_or_path",
    "pretrained_vae_name_or_path",
    "model_name",
    "save_format",
    "save_half",
    "resume_from",
)
DATASET_FIELDS = (
    "resolution",
    "center_crop",
    "hflip",
    "use_txt_as_label",
    "use_filename_as_label",
    "caption_template",
    "use_aspect_ratio_bucket",
    "aspect_buckets",
    "bucket_min_side",
    "bucket_max_side",
    "debug_arb",
    "augment_probability",
    "augment_rotation",
    "augment_brightness",
    "augment_contrast",
    "augment_random_crop",
    "augment_variants",
    "inpainting_full_mask_ratio",
)
PARAMETER_GROUPS = (
    ("basics", "Basics"),
    ("optimizer", "Learning rate and optimiser"),
    ("memory", "Memory and speed"),
    ("text_encoder", "Text encoder"),
    ("prior", "Prior preservation"),
    ("saving", "Saving"),
    ("samples", "Samples and tests"),
    ("logging", "Logging"),
)
LIST_FIELDS = ("concepts",)  # edited by the concept editor, not by one widget


@dataclass(frozen=True)
class FieldSpec:
    """What a widget needs to know about one field."""

    name: str
    kind: str  # bool, int, float, choice, text
    label: str
    help: str
    default: Any
    optional: bool  # None allowed (an empty number box)
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...] | None

    @property
    def elem_id(self) -> str:
        return f"db_{self.name}"


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
        label=field.name,
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


def panel_of(spec: FieldSpec) -> str:
    """``model``, ``dataset`` or a parameter group."""
    if spec.name in MODEL_FIELDS:
        return "model"
    if spec.name in DATASET_FIELDS:
        return "dataset"
    return {f.name: f for f in dataclasses.fields(Settings)}[spec.name].metadata["group"]


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
