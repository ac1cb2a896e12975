"""The settings schema: validation sentences, JSON files and migrations, overrides, concepts lists, self-checks."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from PIL import Image

from dreambooth import validation
from dreambooth.settings import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Concept,
    Settings,
    SettingsError,
    concepts_from_list,
    fields,
    migrate,
)

# ------------------------------------------------------------------------------------------------- helpers


def draw_images(folder: Path, count: int, size: int = 16) -> Path:
    """``count`` small PNGs in ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (size, size), (index * 40 % 256, 100, 200)).save(folder / f"image{index}.png")
    return folder


def make_valid(tmp_path: Path) -> Settings:
    """Settings that pass every check, files included: a model file, an output folder, one concept of 2 images."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"not really a model; validation only checks that it exists")
    images = draw_images(tmp_path / "instance", 2)
    return Settings(
        pretrained_model_name_or_path=str(model),
        output_dir=str(tmp_path / "out"),
        concepts=[Concept(instance_data_dir=str(images), instance_prompt="photo of zwx dog")],
    )


@pytest.fixture
def valid(tmp_path) -> Settings:
    return make_valid(tmp_path)


def fake_find_spec(monkeypatch, missing: str) -> None:
    """``importlib.util.find_spec`` as dreambooth.validation sees it, answering None for ``missing``."""
    original = validation.importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == missing else original(name, *args, **kwargs)

    monkeypatch.setattr(validation.importlib.util, "find_spec", find_spec)


# ------------------------------------------------------------------------------------------------- validate


def test_valid_settings_have_no_problems(valid):
    assert valid.validate() == []
    assert valid.validate(check_files=False) == []
    valid.raise_if_invalid()


def _set(**changes):
    def apply(s, tmp_path, monkeypatch):
        for key, value in changes.items():
            setattr(s, key, value)

    return apply


def _concept(**changes):
    def apply(s, tmp_path, monkeypatch):
        for key, value in changes.items():
            setattr(s.concepts[0], key, value)

    return apply


def _no_concepts(s, tmp_path, monkeypatch):
    s.concepts = []


def _missing_folder(s, tmp_path, monkeypatch):
    s.concepts[0].instance_data_dir = str(tmp_path / "no-such-folder")


def _empty_folder(s, tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    s.concepts[0].instance_data_dir = str(empty)


def _prior_without_class_prompt(s, tmp_path, monkeypatch):
    s.with_prior_preservation = True
    s.concepts[0].class_data_dir = str(tmp_path / "class")


def _prior_without_class_dir(s, tmp_path, monkeypatch):
    s.with_prior_preservation = True
    s.concepts[0].class_prompt = "photo of a dog"


def _bitsandbytes_missing(s, tmp_path, monkeypatch):
    fake_find_spec(monkeypatch, "bitsandbytes")
    s.optimizer = "adamw_8bit"


def _xformers_missing(s, tmp_path, monkeypatch):
    fake_find_spec(monkeypatch, "xformers")
    s.attention = "xformers"


def _missing_prompts_file(s, tmp_path, monkeypatch):
    s.test_prompts_file = str(tmp_path / "prompts.txt")


def _resume_without_state(s, tmp_path, monkeypatch):
    folder = tmp_path / "out" / "state" / "step-10"
    folder.mkdir(parents=True)
    s.resume_from = str(folder)


CASES = {
    "resolution not a multiple of 8": (_set(resolution=500), ["resolution is 500", "multiple of 8", "496"]),
    "both caption sources": (
        _set(use_txt_as_label=True, use_filename_as_label=True),
        ["use_txt_as_label and use_filename_as_label cannot both be on"],
    ),
    "no concept": (_no_concepts, ["no concept", "at least one concept"]),
    "empty output_dir": (_set(output_dir=""), ["output_dir is empty"]),
    "empty model path": (_set(pretrained_model_name_or_path=""), ["pretrained_model_name_or_path is empty"]),
    "model_name with a slash": (_set(model_name="runs/dog"), ["model_name 'runs/dog'", "plain file name"]),
    "fp16 on cpu": (_set(mixed_precision="fp16", device="cpu"), ["mixed_precision fp16 needs a CUDA GPU"]),
    "adamw_8bit without bitsandbytes": (
        _bitsandbytes_missing,
        ["optimizer adamw_8bit needs the bitsandbytes package", "choose optimizer adamw"],
    ),
    "xformers missing": (_xformers_missing, ["attention xformers needs the xformers package", "choose sdpa"]),
    "empty instance_prompt": (_concept(instance_prompt="  "), ["concept 1: instance_prompt is empty"]),
    "missing instance folder": (_missing_folder, ["concept 1: instance_data_dir", "no-such-folder", "is not a folder"]),
    "folder with no images": (_empty_folder, ["concept 1: no images", "empty"]),
    "prior preservation without class_prompt": (
        _prior_without_class_prompt,
        ["concept 1: prior preservation needs a class_prompt"],
    ),
    "prior preservation without class_data_dir": (
        _prior_without_class_dir,
        ["concept 1: prior preservation needs a class_data_dir"],
    ),
    "batch larger than the images": (_set(train_batch_size=3), ["train_batch_size is 3", "only 2 instance images"]),
    "value not among choices": (
        _set(lr_scheduler="bogus"),
        ["lr_scheduler is 'bogus'", "must be one of", "cosine_with_restarts"],
    ),
    "value below minimum": (_set(resolution=32), ["resolution is 32", "must be at least 64"]),
    "value above maximum": (_set(learning_rate=2.0), ["learning_rate is 2.0", "must be at most 1.0"]),
    "concept value below minimum": (
        _concept(num_class_images=-1),
        ["concept 1: num_class_images is -1", "must be at least 0"],
    ),
    "missing test_prompts_file": (_missing_prompts_file, ["test_prompts_file", "prompts.txt", "does not exist"]),
    "resume_from without state.json": (
        _resume_without_state,
        ["resume_from", "step-10", "not a training state folder", "state.json"],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_each_rule_gives_its_own_sentence(case, valid, tmp_path, monkeypatch):
    mutate, expected = CASES[case]
    mutate(valid, tmp_path, monkeypatch)
    problems = valid.validate()
    assert len(problems) == 1, problems
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    with pytest.raises(SettingsError) as caught:
        valid.raise_if_invalid()
    assert caught.value.problems == problems
    assert problems[0] in str(caught.value)


def test_every_problem_is_reported_at_once(valid):
    valid.resolution = 500
    valid.output_dir = ""
    valid.lr_scheduler = "bogus"
    valid.concepts[0].instance_prompt = ""
    problems = valid.validate()
    assert len(problems) == 4
    assert any("resolution is 500" in p for p in problems)
    assert any("output_dir is empty" in p for p in problems)
    assert any("lr_scheduler is 'bogus'" in p for p in problems)
    assert any("instance_prompt is empty" in p for p in problems)


def test_installed_packages_are_accepted(valid, monkeypatch):
    monkeypatch.setattr(validation.importlib.util, "find_spec", lambda name, *a, **k: object())
    valid.optimizer = "adamw_8bit"
    valid.attention = "xformers"
    assert valid.validate() == []


def test_prior_preservation_with_class_prompt_and_folder_is_valid(valid, tmp_path):
    valid.with_prior_preservation = True
    valid.concepts[0].class_prompt = "photo of a dog"
    valid.concepts[0].class_data_dir = str(tmp_path / "class-not-yet-generated")
    assert valid.validate() == []


def test_class_data_dir_that_is_a_file(valid, tmp_path):
    afile = tmp_path / "class.txt"
    afile.write_text("x")
    valid.with_prior_preservation = True
    valid.concepts[0].class_prompt = "photo of a dog"
    valid.concepts[0].class_data_dir = str(afile)
    problems = valid.validate()
    assert any("class_data_dir" in p and "is a file, not a folder" in p for p in problems), problems
    assert valid.validate(check_files=False) == []


def test_resume_from_with_state_json_is_valid(valid, tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    (folder / "state.json").write_text('{"version": 1, "step": 3, "modules": ["unet"]}')
    valid.resume_from = str(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n")
    valid.test_prompts_file = str(prompts)
    assert "not a training state folder" in valid.validate()[0]  # incomplete: its files are missing
    for name in ("unet.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"):
        (folder / name).write_bytes(b"x")
    assert valid.validate() == []


def test_check_files_false_skips_filesystem_checks(valid, tmp_path):
    valid.pretrained_model_name_or_path = str(tmp_path / "missing.safetensors")
    valid.pretrained_vae_name_or_path = str(tmp_path / "missing-vae")
    valid.test_prompts_file = str(tmp_path / "missing.txt")
    valid.resume_from = str(tmp_path / "no-state")
    valid.train_batch_size = 5
    valid.concepts.append(Concept(instance_data_dir=str(tmp_path / "no-such-folder"), instance_prompt="zwx cat"))
    empty = tmp_path / "empty"
    empty.mkdir()
    valid.concepts.append(Concept(instance_data_dir=str(empty), instance_prompt="zwx bird"))

    assert valid.validate(check_files=False) == []
    problems = valid.validate(check_files=True)
    for text in (
        "pretrained_model_name_or_path:",
        "pretrained_vae_name_or_path:",
        "test_prompts_file:",
        "resume_from:",
        "concept 2: instance_data_dir",
        "concept 3: no images",
        "train_batch_size is 5",
    ):
        assert any(text in p for p in problems), (text, problems)


def test_check_files_false_still_checks_everything_else(valid):
    valid.resolution = 500
    valid.concepts[0].instance_data_dir = ""
    problems = valid.validate(check_files=False)
    assert any("multiple of 8" in p for p in problems)
    assert any("instance_data_dir is empty" in p for p in problems)


# ------------------------------------------------------------------------------------------------- JSON files


def test_json_round_trip(valid, tmp_path):
    valid.concepts.append(
        Concept(
            instance_data_dir=str(tmp_path / "cat"),
            instance_prompt="photo of zwx cat",
            class_data_dir=str(tmp_path / "class-cat"),
            class_prompt="photo of a cat",
            class_negative_prompt="blurry",
            num_class_images=12,
            sample_prompt="zwx cat on the moon",
        )
    )
    valid.learning_rate = 1e-4
    valid.text_encoder_learning_rate = 5e-7
    valid.train_text_encoder = True
    valid.max_train_steps = 400
    valid.lr_scheduler = "cosine_with_restarts"
    valid.mixed_precision = "bf16"
    valid.save_half = True
    valid.cache_latents = False
    valid.caption_template = "[P], [PX]"

    path = valid.save(tmp_path / "sub" / "settings.json")
    assert path == tmp_path / "sub" / "settings.json"
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["schema_version"] == 2 == SCHEMA_VERSION
    assert raw["concepts"][1]["num_class_images"] == 12
    loaded = Settings.load(path)
    assert loaded == valid
    assert loaded is not valid
    assert isinstance(loaded.concepts[0], Concept)
    assert not list(path.parent.glob("*.tmp")), "the atomic write left its temporary file"


def test_default_settings_round_trip(tmp_path):
    path = Settings().save(tmp_path / "defaults.json")
    assert Settings.load(path) == Settings()
    assert json.loads(path.read_text())["schema_version"] == 2


def test_load_unreadable_file_names_the_path(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        Settings.load(broken)
    assert str(broken) in caught.value.problems[0]
    assert "cannot read the settings file" in caught.value.problems[0]

    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(SettingsError, match="one JSON object"):
        Settings.load(listed)

    with pytest.raises(SettingsError, match=r"missing\.json"):
        Settings.load(tmp_path / "missing.json")


# ------------------------------------------------------------------------------------------------- migrations

V1 = {
    "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
    "instance_data_dir": "data/dog",
    "instance_prompt": "photo of sks dog",
    "class_data_dir": "data/class-dog",
    "class_prompt": "photo of a dog",
    "use_8bit_adam": True,
    "enable_xformers_memory_efficient_attention": False,
    "not_cache_latents": True,
    "save_interval": 50,
    "resolution": 512,
    "with_prior_preservation": True,
}


def test_migration_from_version_1_file(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps(V1), encoding="utf-8")
    settings = Settings.load(path)
    assert len(settings.concepts) == 1
    concept = settings.concepts[0]
    assert concept.instance_prompt == "photo of sks dog"
    assert concept.class_prompt == "photo of a dog"
    assert concept.instance_data_dir == str((tmp_path / "data" / "dog").resolve())
    assert concept.class_data_dir == str((tmp_path / "data" / "class-dog").resolve())
    assert settings.optimizer == "adamw_8bit"
    assert settings.attention == "sdpa"
    assert settings.cache_latents is False
    assert settings.save_model_every_n_steps == 50
    assert settings.with_prior_preservation is True
    assert settings.pretrained_model_name_or_path == "runwayml/stable-diffusion-v1-5"

    # saved again, it is a version-2 file that loads to the same settings
    resaved = settings.save(tmp_path / "new.json")
    raw = json.loads(resaved.read_text())
    assert raw["schema_version"] == 2
    assert "use_8bit_adam" not in raw
    assert "instance_prompt" not in raw
    assert Settings.load(resaved) == settings


def test_migration_opposite_flags():
    data = migrate(
        {
            "use_8bit_adam": False,
            "enable_xformers_memory_efficient_attention": True,
            "not_cache_latents": False,
        }
    )
    assert data == {"optimizer": "adamw", "attention": "xformers", "cache_latents": True}


def test_migrate_steps_and_leaves_version_2_alone():
    assert set(MIGRATIONS) == set(range(1, SCHEMA_VERSION))
    current = {"schema_version": 2, "resolution": 768, "instance_prompt_typo": 1}
    assert migrate(dict(current)) == {"resolution": 768, "instance_prompt_typo": 1}
    explicit_v1 = migrate({"schema_version": 1, "instance_prompt": "sks"})
    assert explicit_v1 == {"concepts": [{"instance_prompt": "sks"}]}


def test_from_dict_does_not_modify_its_argument():
    data = json.loads(json.dumps(V1))
    Settings.from_dict(data)
    assert data == V1


@pytest.mark.parametrize("version", [99, 0, "2"])
def test_unknown_schema_version_is_refused(version, tmp_path):
    path = tmp_path / "future.json"
    path.write_text(json.dumps({"schema_version": version, "resolution": 512}), encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        Settings.load(path)
    message = caught.value.problems[0]
    assert f"schema_version {version!r}" in message
    assert "not known" in message
    assert f"1 to {SCHEMA_VERSION}" in message


# ------------------------------------------------------------------------------------------------- from_dict


def test_unknown_top_level_key_is_named():
    with pytest.raises(SettingsError) as caught:
        Settings.from_dict({"schema_version": 2, "learning_rat": 1e-5, "resolution": 512})
    assert len(caught.value.problems) == 1
    assert "unknown setting 'learning_rat'" in caught.value.problems[0]


def test_unknown_concept_key_is_named():
    data = {"schema_version": 2, "concepts": [{"instance_prompt": "zwx"}, {"instance_promt": "zwx", "colour": 1}]}
    with pytest.raises(SettingsError) as caught:
        Settings.from_dict(data)
    assert len(caught.value.problems) == 1
    problem = caught.value.problems[0]
    assert problem.startswith("concept 2:")
    assert "instance_promt" in problem
    assert "colour" in problem


def test_all_problems_of_a_file_are_reported_together():
    data = {"schema_version": 2, "typo_a": 1, "typo_b": 2, "resolution": "big", "concepts": ["not an object"]}
    with pytest.raises(SettingsError) as caught:
        Settings.from_dict(data)
    problems = caught.value.problems
    assert any("'typo_a'" in p for p in problems)
    assert any("'typo_b'" in p for p in problems)
    assert any("'resolution' must be a whole number" in p for p in problems)
    assert any("concept 1 must be an object" in p for p in problems)


def test_concepts_must_be_a_list():
    with pytest.raises(SettingsError, match="'concepts' must be a list"):
        Settings.from_dict({"schema_version": 2, "concepts": {"instance_prompt": "zwx"}})


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("resolution", "512", "'resolution' must be a whole number, not '512'"),
        ("resolution", 1.5, "'resolution' must be a whole number, not 1.5"),
        ("train_batch_size", True, "'train_batch_size' must be a whole number, not True"),
        ("max_train_steps", "100", "'max_train_steps' must be a whole number"),
        ("center_crop", "yes", "'center_crop' must be true or false, not 'yes'"),
        ("center_crop", 1, "'center_crop' must be true or false, not 1"),
        ("learning_rate", "fast", "'learning_rate' must be a number, not 'fast'"),
        ("learning_rate", False, "'learning_rate' must be a number"),
        ("model_name", 5, "'model_name' must be text, not 5"),
        ("resolution", None, "'resolution' needs a value"),
    ],
)
def test_wrong_types_give_sentences(key, value, expected):
    with pytest.raises(SettingsError) as caught:
        Settings.from_dict({"schema_version": 2, key: value})
    assert any(expected in p for p in caught.value.problems), caught.value.problems


def test_whole_floats_are_accepted_as_ints():
    settings = Settings.from_dict(
        {"schema_version": 2, "resolution": 768.0, "max_train_steps": 3.0, "learning_rate": 1, "num_train_epochs": None}
    )
    assert settings.resolution == 768
    assert type(settings.resolution) is int
    assert settings.max_train_steps == 3
    assert type(settings.max_train_steps) is int
    assert settings.learning_rate == 1.0
    assert type(settings.learning_rate) is float
    assert settings.num_train_epochs is None


def test_aliases_map_to_their_fields():
    settings = Settings.from_dict({"schema_version": 2, "save_unet_half": True, "lr_num_cycles": 3, "save_interval": 7})
    assert settings.save_half is True
    assert settings.lr_cycles == 3
    assert settings.save_model_every_n_steps == 7


def test_alias_values_are_type_checked_under_the_field_name():
    with pytest.raises(SettingsError) as caught:
        Settings.from_dict({"schema_version": 2, "lr_num_cycles": "three"})
    assert any("'lr_cycles' must be a whole number" in p for p in caught.value.problems)


def test_relative_concept_paths_resolve_against_the_json_folder(tmp_path):
    folder = tmp_path / "project" / "configs"
    folder.mkdir(parents=True)
    absolute = tmp_path / "elsewhere" / "class"
    data = {
        "schema_version": 2,
        "concepts": [
            {"instance_data_dir": "images/dog", "class_data_dir": str(absolute), "instance_prompt": "zwx"},
            {"instance_data_dir": "../shared/cat", "class_data_dir": "", "instance_prompt": "zwx cat"},
        ],
    }
    path = folder / "settings.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    settings = Settings.load(path)
    first, second = settings.concepts
    assert first.instance_data_dir == str((folder / "images" / "dog").resolve())
    assert Path(first.instance_data_dir).is_absolute()
    assert first.class_data_dir == str(absolute)
    assert second.instance_data_dir == str((tmp_path / "project" / "shared" / "cat").resolve())
    assert second.class_data_dir == ""


def test_from_dict_without_base_dir_keeps_relative_paths():
    settings = Settings.from_dict({"schema_version": 2, "concepts": [{"instance_data_dir": "images/dog"}]})
    assert settings.concepts[0].instance_data_dir == "images/dog"


def test_relative_paths_found_from_another_working_directory(tmp_path, monkeypatch):
    """A settings file beside its images validates wherever the program is started."""
    valid = make_valid(tmp_path)
    valid.concepts[0].instance_data_dir = "instance"
    path = tmp_path / "settings.json"
    path.write_text(valid.to_json(), encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert Settings.load(path).validate() == []


# ------------------------------------------------------------------------------------------------- concepts list


def test_concepts_from_community_list(tmp_path):
    folder = tmp_path / "my-project"
    folder.mkdir()
    community = [
        {
            "instance_prompt": "photo of zwx dog",
            "class_prompt": "photo of a dog",
            "instance_data_dir": "data/zwx",
            "class_data_dir": "data/dog",
        },
        {
            "instance_prompt": "photo of ukj person",
            "class_prompt": "photo of a person",
            "instance_data_dir": str(tmp_path / "abs" / "ukj"),
            "class_data_dir": "data/person",
        },
    ]
    path = folder / "concepts_list.json"
    path.write_text(json.dumps(community), encoding="utf-8")
    concepts = concepts_from_list(path)
    assert [c.instance_prompt for c in concepts] == ["photo of zwx dog", "photo of ukj person"]
    assert [c.class_prompt for c in concepts] == ["photo of a dog", "photo of a person"]
    assert concepts[0].instance_data_dir == str((folder / "data" / "zwx").resolve())
    assert concepts[0].class_data_dir == str((folder / "data" / "dog").resolve())
    assert concepts[1].instance_data_dir == str(tmp_path / "abs" / "ukj")
    assert concepts[1].class_data_dir == str((folder / "data" / "person").resolve())
    assert all(isinstance(c, Concept) for c in concepts)
    assert all(c.num_class_images is None for c in concepts)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"instance_prompt": "zwx"}', "a concepts list is a JSON list"),
        ("[{", "cannot read the concepts list"),
    ],
    ids=["not a list", "invalid json"],
)
def test_bad_concepts_list_names_the_path(content, expected, tmp_path):
    path = tmp_path / "concepts_list.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(SettingsError) as caught:
        concepts_from_list(path)
    assert str(path) in str(caught.value)
    assert expected in caught.value.problems[0]


def test_missing_concepts_list_names_the_path(tmp_path):
    path = tmp_path / "nowhere.json"
    with pytest.raises(SettingsError) as caught:
        concepts_from_list(path)
    assert str(path) in caught.value.problems[0]


def test_concepts_list_with_unknown_field(tmp_path):
    path = tmp_path / "concepts_list.json"
    path.write_text(json.dumps([{"instance_prompt": "zwx", "instance_dir": "x"}]), encoding="utf-8")
    with pytest.raises(SettingsError, match="instance_dir"):
        concepts_from_list(path)


# ------------------------------------------------------------------------------------------------- overrides


def test_with_overrides_sets_typed_values(valid):
    before = dataclasses.replace(valid, concepts=list(valid.concepts))
    changed = valid.with_overrides(
        ["learning_rate=1e-4", "train_text_encoder=true", "model_name=abc", "save_interval=10"]
    )
    assert changed.learning_rate == 1e-4
    assert type(changed.learning_rate) is float
    assert changed.train_text_encoder is True
    assert changed.model_name == "abc"
    assert changed.save_model_every_n_steps == 10
    assert type(changed.save_model_every_n_steps) is int
    assert changed.concepts == valid.concepts
    assert changed.pretrained_model_name_or_path == valid.pretrained_model_name_or_path
    assert valid == before, "with_overrides changed the original"


def test_with_overrides_value_may_contain_equals_and_spaces(valid):
    changed = valid.with_overrides([" save_sample_prompt =a=b c", "text_encoder_learning_rate=null"])
    assert changed.save_sample_prompt == "a=b c"
    assert changed.text_encoder_learning_rate is None


def test_with_overrides_can_replace_concepts(valid, tmp_path):
    concept = {"instance_data_dir": str(tmp_path / "x"), "instance_prompt": "zwx"}
    changed = valid.with_overrides([f"concepts={json.dumps([concept, concept])}"])
    assert changed.concepts == [Concept(**concept), Concept(**concept)]


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("learning_rate", "--set expects key=value, got 'learning_rate'"),
        ("learning_rat=1", "unknown setting 'learning_rat'"),
        ("resolution=big", "'resolution' must be a whole number"),
        ("train_text_encoder=maybe", "'train_text_encoder' must be true or false"),
    ],
)
def test_with_overrides_errors(assignment, expected, valid):
    with pytest.raises(SettingsError) as caught:
        valid.with_overrides(["resolution=768", assignment])
    assert any(expected in p for p in caught.value.problems), caught.value.problems


# ------------------------------------------------------------------------------------------------- schema self-check

ALL_FIELDS = [(f"Settings.{f.name}", f) for f in fields()] + [
    (f"Concept.{f.name}", f) for f in dataclasses.fields(Concept)
]


@pytest.mark.parametrize("spec", [f for _, f in ALL_FIELDS], ids=[name for name, _ in ALL_FIELDS])
def test_field_metadata_is_complete(spec):
    meta = spec.metadata
    assert isinstance(meta.get("help"), str)
    assert meta["help"].strip()
    assert isinstance(meta.get("group"), str)
    assert meta["group"].strip()
    default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
    if meta.get("choices"):
        assert default in meta["choices"]
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if meta.get("minimum") is not None:
            assert default >= meta["minimum"]
        if meta.get("maximum") is not None:
            assert default <= meta["maximum"]
    if meta.get("minimum") is not None and meta.get("maximum") is not None:
        assert meta["minimum"] <= meta["maximum"]


def test_fields_are_the_settings_fields_in_order():
    assert [f.name for f in fields()] == [f.name for f in dataclasses.fields(Settings)]
    assert len(fields()) > 40


def test_aliases_are_unique_and_do_not_shadow_fields():
    names = {f.name for f in fields()}
    aliases = [a for f in fields() for a in f.metadata["aliases"]]
    assert len(aliases) == len(set(aliases))
    assert not names & set(aliases)


def test_defaults_break_no_bounds():
    problems = Settings().validate(check_files=False)
    assert not any("must be one of" in p or "must be at least" in p or "must be at most" in p for p in problems)
    assert not any("multiple of 8" in p for p in problems)


def test_list_defaults_are_not_shared():
    first, second = Settings(), Settings()
    first.concepts.append(Concept(instance_prompt="zwx"))
    assert second.concepts == []


# ------------------------------------------------------------------------------------------------- effective


def test_effective_is_a_copy_and_leaves_low_memory_to_the_trainer(valid):
    valid.low_memory = True
    valid.gradient_checkpointing = False
    effective = valid.effective()
    assert effective.gradient_checkpointing is False  # the fit preset is the trainer's (tests/test_fit.py)
    assert effective.low_memory is True
    assert valid.gradient_checkpointing is False
    assert effective is not valid
    assert effective.concepts == valid.concepts
    effective.concepts[0].instance_prompt = "changed"
    effective.concepts.append(Concept())
    assert valid.concepts[0].instance_prompt == "photo of zwx dog"
    assert len(valid.concepts) == 1


def test_effective_without_low_memory_is_an_equal_copy(valid):
    effective = valid.effective()
    assert effective == valid
    assert effective.gradient_checkpointing is False
    assert effective is not valid


def test_derived_helpers(valid):
    assert valid.text_encoder_lr() == valid.learning_rate
    valid.text_encoder_learning_rate = 1e-7
    assert valid.text_encoder_lr() == 1e-7
    assert valid.class_images_for(valid.concepts[0]) == 100
    valid.concepts[0].num_class_images = 0
    assert valid.class_images_for(valid.concepts[0]) == 0
    assert valid.has_prior_preservation is False


# ---------------------------------------------------------------------------- bugs found by review, now fixed


@pytest.mark.parametrize("text", ["NaN", "Infinity"])
def test_non_finite_number_for_an_int_is_a_sentence(text):
    with pytest.raises(SettingsError, match="resolution"):
        Settings().with_overrides([f"resolution={text}"])


def test_nan_learning_rate_is_a_problem():
    with pytest.raises(SettingsError, match="learning_rate"):
        Settings.from_dict({"schema_version": 2, "learning_rate": math.nan})


def test_concept_null_prompt_is_a_sentence():
    data = {"schema_version": 2, "concepts": [{"instance_data_dir": "/x", "instance_prompt": None}]}
    with pytest.raises(SettingsError, match="instance_prompt"):
        Settings.from_dict(data).validate(check_files=False)


def test_concept_number_as_folder_is_a_sentence(tmp_path):
    data = {"schema_version": 2, "concepts": [{"instance_data_dir": 5, "instance_prompt": "zwx"}]}
    with pytest.raises(SettingsError, match="instance_data_dir"):
        Settings.from_dict(data, base_dir=tmp_path)


def test_concept_text_as_count_is_a_problem():
    data = {
        "schema_version": 2,
        "concepts": [{"instance_data_dir": "/x", "instance_prompt": "z", "num_class_images": "10"}],
    }
    try:
        settings = Settings.from_dict(data)
    except SettingsError as error:
        assert any("num_class_images" in p for p in error.problems)
        return
    assert any("num_class_images" in p for p in settings.validate(check_files=False))


def test_override_text_field_with_digits():
    assert Settings().with_overrides(["model_name=2024"]).model_name == "2024"
