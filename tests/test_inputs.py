"""Settings as users and attackers bring them: the guide's configs, hostile values, labels, --set of concept fields.

Every hostile value must end in a sentence naming its field -- from :meth:`Settings.from_dict`, from
:meth:`Settings.validate`, from ``python -m dreambooth train`` (exit 2, no traceback) and from the REST route
(4xx, never 500) -- never in a traceback, a hang or a silent success.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from dreambooth import cli, validation
from dreambooth.settings import Concept, Settings, SettingsError, fields

ROOT = Path(__file__).resolve().parents[1]


def draw_images(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (16, 16), (index * 60, 90, 200)).save(folder / f"image{index}.png")
    return folder


def valid_dict(tmp_path: Path) -> dict:
    """A settings file's content that passes every check, files included."""
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"validation only checks that it exists")
    return {
        "schema_version": 2,
        "pretrained_model_name_or_path": str(model),
        "output_dir": str(tmp_path / "out"),
        "concepts": [{"instance_data_dir": str(draw_images(tmp_path / "instance")), "instance_prompt": "photo of zwx"}],
    }


# ---------------------------------------------------------------------------------- item 10: the guide's configs

# Every name of the guide's parameter table (ShivamShrirao's train_dreambooth.py) and of its notebook (CCRcmcpe's
# fork, RcINS' Colab), with the values those configs hold.
GUIDE_CONFIG = {
    # the parameter table
    "pretrained_model_name_or_path": "models/diffusers_model",
    "revision": "fp16",
    "tokenizer_name": "openai/clip-vit-large-patch14",
    "instance_data_dir": "data/zwx",
    "class_data_dir": "data/dog",
    "instance_prompt": "photo of zwx dog",
    "class_prompt": "photo of a dog",
    "with_prior_preservation": True,
    "prior_loss_weight": 1.0,
    "num_class_images": 100,
    "output_dir": "models/out",
    "seed": 1337,
    "resolution": 512,
    "center_crop": True,
    "use_filename_as_label": False,
    "train_text_encoder": False,
    "train_batch_size": 1,
    "sample_batch_size": 4,
    "num_train_epochs": 1,
    "max_train_steps": 800,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True,
    "learning_rate": 1e-6,
    "scale_lr": False,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "use_8bit_adam": True,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 0.01,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "push_to_hub": False,
    "hub_token": None,
    "hub_model_id": None,
    "logging_dir": "logs",
    "log_with": "tensorboard",
    "mixed_precision": "fp16",
    "local_rank": -1,
    "save_model_every_n_steps": 500,
    "auto_test_model": True,
    "test_prompt": "photo of zwx dog on a beach",
    "test_prompts_file": "test_prompts.txt",
    "test_negative_prompt": "",
    "test_seed": 123,
    "test_num_per_prompt": 3,
    # the notebook
    "pretrained_vae_name_or_path": "models/diffusers_model/vae",
    "lr_cycles": 1,
    "last_epoch": 5,
    "save_interval": 10000,
    "class_negative_prompt": "lowres, bad anatomy",
    "save_sample_prompt": "photo of zwx dog, looking at viewer",
    "save_sample_negative_prompt": "lowres",
    "n_save_sample": 2,
    "infer_batch_size": 2,
    "infer_steps": 30,
    "guidance_scale": 7.0,
    "save_unet_half": True,
    "clip_skip": 2,
    "wandb": False,
    "read_prompt_from_txt": "instance",
    "use_aspect_ratio_bucket": False,
    "debug_arb": False,
    "not_cache_latents": True,
}


@pytest.mark.parametrize("versioned", [True, False], ids=["schema_version 2", "no schema_version"])
def test_a_config_with_every_name_of_the_guide_loads(versioned, tmp_path):
    data = dict(GUIDE_CONFIG, schema_version=2) if versioned else dict(GUIDE_CONFIG)
    path = tmp_path / "guide.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    notes: list[str] = []
    settings = Settings.load(path, notes=notes)

    # renamed: the same meaning under our name
    assert settings.report_to == "tensorboard"
    assert settings.test_images_per_prompt == 3
    assert settings.save_infer_steps == 30
    assert settings.save_guidance_scale == 7.0
    assert settings.save_half is True
    # stored differently: translated
    assert settings.optimizer == "adamw_8bit"
    assert settings.cache_latents is False
    assert settings.use_txt_as_label is True
    assert settings.test_prompt == "photo of zwx dog on a beach"
    assert settings.concepts == [
        Concept(
            instance_data_dir=str((tmp_path / "data/zwx").resolve()),
            instance_prompt="photo of zwx dog",
            class_data_dir=str((tmp_path / "data/dog").resolve()),
            class_prompt="photo of a dog",
            class_negative_prompt="lowres, bad anatomy",
        )
    ]
    # both names of one setting: ours wins, and the other is reported
    assert settings.sample_batch_size == 4
    assert settings.save_model_every_n_steps == 500
    text = "\n".join(notes)
    assert "'infer_batch_size' (2) is not used: 'sample_batch_size' (4)" in text
    assert "'save_interval' (10000) is not used" in text
    # hub-only and launcher names: accepted, each reported as ignored with its reason
    assert "'revision' ('fp16') is ignored" in text and "hub" in text
    assert "'tokenizer_name' ('openai/clip-vit-large-patch14') is ignored" in text
    assert "'last_epoch' (5) is ignored" in text and "resume_from" in text
    assert "'read_prompt_from_txt' was read as use_txt_as_label = True" in text
    if versioned:  # (a file without a version is migrated from v1, which knew these two names)
        assert "'use_8bit_adam' was read as optimizer = 'adamw_8bit'" in text
        assert "'not_cache_latents' was read as cache_latents = False" in text
    # "not given" values of the guide (push_to_hub false, hub_token null, local_rank -1, wandb false) say nothing
    assert "push_to_hub" not in text and "hub_token" not in text and "local_rank" not in text and "wandb" not in text
    # saved again, the file holds only our names and loads to the same settings without notes
    again: list[str] = []
    assert Settings.load(settings.save(tmp_path / "ours.json"), notes=again) == settings
    assert again == []


def test_guide_names_in_a_versioned_file_are_translated():
    settings = Settings.from_dict({"schema_version": 2, "use_8bit_adam": False, "not_cache_latents": False})
    assert settings.optimizer == "adamw" and settings.cache_latents is True


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"use_8bit_adam": True, "optimizer": "adamw"}, "'use_8bit_adam' says optimizer 'adamw_8bit'"),
        ({"not_cache_latents": "yes"}, "'not_cache_latents' must be true or false"),
        ({"read_prompt_from_txt": "sometimes"}, "'read_prompt_from_txt' must be no, instance, class or both"),
        ({"concepts_list": 5}, "'concepts_list' must be the path"),
        ({"instance_prompt": "zwx", "concepts": [{"instance_prompt": "a"}, {}]}, "top-level 'instance_prompt'"),
    ],
)
def test_contradicting_or_malformed_guide_names_are_problems(data, expected):
    with pytest.raises(SettingsError) as caught:
        Settings.from_dict({"schema_version": 2, **data})
    assert any(expected in p for p in caught.value.problems), caught.value.problems


def test_auto_test_model_false_turns_the_guide_test_prompt_off_and_says_so():
    notes: list[str] = []
    settings = Settings.from_dict(
        {"schema_version": 2, "auto_test_model": False, "test_prompt": "A photo of a cat"}, notes=notes
    )
    assert settings.test_prompt == ""
    assert any("auto_test_model is false, so test_prompt" in n for n in notes)


def test_concepts_list_path_of_the_guide_is_read(tmp_path):
    folder = tmp_path / "lists"
    folder.mkdir()
    items = [{"instance_prompt": "photo of zwx dog", "class_prompt": "photo of a dog", "instance_data_dir": "zwx"}]
    (folder / "concepts_list.json").write_text(json.dumps(items), encoding="utf-8")
    settings = Settings.from_dict(
        {"concepts_list": "lists/concepts_list.json", "class_negative_prompt": "blurry"}, base_dir=tmp_path
    )
    assert settings.concepts[0].instance_data_dir == str((folder / "zwx").resolve())
    assert settings.concepts[0].class_negative_prompt == "blurry"


# ---------------------------------------------------------------------------------- item 28: labels


@pytest.mark.parametrize(
    "spec",
    list(fields()) + list(dataclasses.fields(Concept)),
    ids=[f"Settings.{f.name}" for f in fields()] + [f"Concept.{f.name}" for f in dataclasses.fields(Concept)],
)
def test_every_field_has_a_human_label(spec):
    label = spec.metadata.get("label")
    assert isinstance(label, str) and label.strip(), f"{spec.name}: setting(..., label='...') is missing"
    assert label != spec.name and "_" not in label, f"{spec.name}: the label is the key, not a name people read"


def test_labels_are_in_the_readme_table_next_to_the_keys():
    from dreambooth.settings_doc import options_markdown

    table = options_markdown()
    assert "| `pretrained_model_name_or_path` | Base model |" in table
    assert "| `instance_data_dir` | Instance images folder |" in table


# ---------------------------------------------------------------------------------- item 32: --set of concept fields


def test_set_reaches_concept_fields(tmp_path):
    base = Settings.from_dict(valid_dict(tmp_path))
    changed = base.with_overrides(
        ["concepts.0.class_data_dir=/data/dog", "concepts.0.num_class_images=7", "class_prompt=photo of a dog"]
    )
    assert changed.concepts[0].class_data_dir == "/data/dog"
    assert changed.concepts[0].num_class_images == 7
    assert changed.concepts[0].class_prompt == "photo of a dog"  # one concept: its fields by their own names
    assert changed.concepts[0].instance_prompt == base.concepts[0].instance_prompt
    assert changed.num_class_images == base.num_class_images  # a top-level setting keeps its own name
    added = changed.with_overrides(["concepts.1.instance_prompt=photo of ukj cat", "concepts.1.instance_data_dir=/x"])
    assert [c.instance_prompt for c in added.concepts] == ["photo of zwx", "photo of ukj cat"]


@pytest.mark.parametrize(
    ("assignment", "expected"),
    [
        ("class_prompt=a dog", "there are 2 concepts; say which one, e.g. --set concepts.0.class_prompt"),
        ("concepts.5.class_prompt=x", "there are 2 concepts (concepts.2 would add one)"),
        ("concepts.0.colour=red", "a concept has no field 'colour'"),
        ("concepts.first.class_prompt=x", "write concepts.N.FIELD=value"),
        ("concepts.0.num_class_images=many", "concept 1: 'num_class_images' must be a whole number"),
    ],
)
def test_set_of_concept_fields_errors_name_the_problem(assignment, expected, tmp_path):
    data = valid_dict(tmp_path)
    data["concepts"].append({"instance_data_dir": "/y", "instance_prompt": "photo of ukj"})
    with pytest.raises(SettingsError) as caught:
        Settings.from_dict(data).with_overrides([assignment])
    assert any(expected in p for p in caught.value.problems), caught.value.problems


def test_train_help_explains_concept_fields(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    assert "concepts.0.class_data_dir" in " ".join(capsys.readouterr().out.split())


# ---------------------------------------------------------------------------------- item 11: values let through


def test_hostile_values_of_the_review_are_refused_with_the_field_named(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = {
        "resolution": 10**400,
        "max_train_steps": 10**20,
        "sample_seed": 2**64,
        "output_dir": str(a_file),
        "model_name": "m" * 300,
        "pretrained_vae_name_or_path": "vae\0.safetensors",
        "save_sample_prompt": "a photo of zwx " * 7000,
        "test_prompts_file": str(tmp_path),
    }
    for key, value in cases.items():
        data = dict(valid_dict(tmp_path), **{key: value})
        try:
            problems = Settings.from_dict(data).validate()
        except SettingsError as error:
            problems = error.problems
        assert any(key in p for p in problems), (key, problems)
        assert all(len(p) < 400 for p in problems), problems  # a 100k prompt is not echoed back


def test_model_name_fits_a_file_name_with_step_and_suffix():
    longest = "é" * (validation.MAX_NAME_BYTES // 2)
    assert validation.name_problem(longest) is None
    assert len(f".{longest}_10000000.safetensors.abcdefgh.tmp".encode()) <= 255
    assert "bytes long" in validation.name_problem(longest + "x")
    for name in ["..", ".hidden", "a/b", "a\\b", "nul", "tab\there", "trailing. "]:
        assert validation.name_problem(name), name


# A hostile value for each kind of field.  Each must end in a problem naming the field.
def hostile_values(spec: dataclasses.Field) -> list:
    kind = str(spec.type)
    meta = spec.metadata
    if kind.startswith("list"):
        return ["x", {"a": 1}, [5], None]
    if kind.startswith("bool"):
        return ["true", 1, None, [], {"a": 1}]
    if kind.startswith("str"):
        values = ["a\0b", "x" * 100_001, 5, ["x"], {"a": 1}, True]
        if "None" not in kind:
            values.append(None)
        if meta.get("choices"):
            values.append("no-such-choice")
        return values
    values = [math.nan, math.inf, -math.inf, "12", [1], True, {"a": 1}, 10**400, -(10**400), -1]
    if meta.get("maximum") is not None:
        values += [meta["maximum"] * 2 + 1, 2**64]
    if kind.startswith("int"):
        values.append(1.5)
    if "None" not in kind:
        values.append(None)
    return values


def fuzz_cases() -> list[tuple[str, str, object]]:
    cases = []
    for spec in fields():
        for value in hostile_values(spec):
            if value == -1 and spec.metadata.get("minimum") is None:
                continue
            cases.append(("", spec.name, value))
    for spec in dataclasses.fields(Concept):
        for value in hostile_values(spec):
            if value == -1 and spec.metadata.get("minimum") is None:
                continue
            cases.append(("concept", spec.name, value))
    return cases


FUZZ = fuzz_cases()


def with_value(tmp_path: Path, where: str, name: str, value: object) -> dict:
    data = valid_dict(tmp_path)
    if where == "concept":
        data["concepts"][0][name] = value
    else:
        data[name] = value
    return data


def problems_of(data: dict) -> list[str]:
    try:
        return Settings.from_dict(data).validate()
    except SettingsError as error:
        return error.problems


def test_fuzzed_values_all_end_in_a_sentence_naming_the_field(tmp_path):
    silent, unnamed = [], []
    for where, name, value in FUZZ:
        problems = problems_of(with_value(tmp_path, where, name, value))
        if not problems:
            silent.append((where, name, repr(value)[:40]))
        elif not any(name in p for p in problems):
            unnamed.append((name, repr(value)[:40], problems))
    assert not silent, f"accepted without a word: {silent}"
    assert not unnamed, f"problems that do not name the field: {unnamed}"


def test_files_given_for_folders_and_folders_for_files(tmp_path):
    a_file = tmp_path / "a_file.txt"
    a_file.write_text("x")
    data = valid_dict(tmp_path)
    data["concepts"][0]["instance_data_dir"] = str(a_file)
    data["concepts"][0]["class_data_dir"] = str(a_file)
    data.update(with_prior_preservation=True, resume_from=str(a_file), test_prompts_file=str(tmp_path))
    data["concepts"][0]["class_prompt"] = "photo of a dog"
    data.update(
        logging_dir=str(a_file), pretrained_model_name_or_path=str(tmp_path), pretrained_vae_name_or_path=str(tmp_path)
    )
    problems = problems_of(data)
    names = ["instance_data_dir", "class_data_dir", "resume_from", "test_prompts_file", "logging_dir"]
    for name in [*names, "pretrained_model_name_or_path", "pretrained_vae_name_or_path"]:
        assert any(name in p for p in problems), (name, problems)


def test_json_files_that_python_cannot_even_read_are_sentences(tmp_path):
    for name, text in {
        "digits": '{"resolution": 1' + "0" * 5000 + "}",
        "deep": "[" * 100_000 + "]" * 100_000,
        "nan": '{"schema_version": 2, "learning_rate": NaN}',
        "bool version": '{"schema_version": true}',
    }.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text, encoding="utf-8")
        with pytest.raises(SettingsError) as caught:
            Settings.load(path)
        assert caught.value.problems, name


# ---------------------------------------------------------------------------------- through the CLI


def cli_train(tmp_path: Path, data: dict, *sets: str, capsys) -> tuple[int, str]:
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    argv = ["train", "--config", str(path)]
    for assignment in sets:
        argv += ["--set", assignment]
    code = cli.main(argv)
    return code, capsys.readouterr().err


def test_fuzzed_values_through_the_cli_exit_2_with_the_field_named(tmp_path, capsys):
    for where, name, value in FUZZ[::3]:  # a third of the table: each kind of value and field still appears
        data = with_value(tmp_path, where, name, value)
        code, err = cli_train(tmp_path, data, capsys=capsys)
        assert code == 2, (name, value, err)
        assert name in err and "Traceback" not in err, (name, err)


@pytest.mark.parametrize(
    ("assignment", "name"),
    [
        ("resolution=1" + "0" * 400, "resolution"),
        ("max_train_steps=100000000000000000000", "max_train_steps"),
        ("sample_seed=18446744073709551616", "sample_seed"),
        ("learning_rate=NaN", "learning_rate"),
        ("seed=-1", "seed"),
        ("model_name=" + "m" * 300, "model_name"),
        ("concepts.0.class_data_dir=" + "x" * 5000, "class_data_dir"),
        ("center_crop=[1]", "center_crop"),
    ],
)
def test_hostile_set_values_through_the_cli(assignment, name, tmp_path, capsys):
    code, err = cli_train(tmp_path, valid_dict(tmp_path), assignment, capsys=capsys)
    assert code == 2 and name in err and "Traceback" not in err, err


def test_cli_prints_the_guide_notes(tmp_path):
    data = valid_dict(tmp_path)
    data.update(revision="fp16", model_name="bad/name")  # invalid, so nothing trains
    path = tmp_path / "guide.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "dreambooth", "train", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "note: 'revision' ('fp16') is ignored" in result.stderr
    assert "model_name 'bad/name'" in result.stderr and "Traceback" not in result.stderr


# ---------------------------------------------------------------------------------- through the REST route


@pytest.fixture
def rest(tmp_path):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi import FastAPI

    from dreambooth.host import Host
    from dreambooth.runner import Runner
    from dreambooth.ui.api import register_routes

    class NoJobs(Host):
        """Every check of the real host, then one more problem, so that nothing ever trains here."""

        def check_settings(self, settings):
            return [*super().check_settings(settings), "(test host: no job starts)"]

    app = FastAPI()
    register_routes(app, Runner(NoJobs(tmp_path / "models", allowed_roots=[tmp_path])))

    def post(payload: dict | None = None, body: str | None = None):
        import asyncio

        import httpx

        async def go():
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                content = json.dumps(payload) if body is None else body  # NaN and Infinity as Python writes them
                headers = {"content-type": "application/json"}
                return await client.post("/dreambooth/start", content=content, headers=headers)

        return asyncio.run(go())

    return post


@pytest.mark.gradio
def test_fuzzed_values_through_the_rest_route_are_4xx_naming_the_field(rest, tmp_path):
    for where, name, value in FUZZ[1::3]:
        data = with_value(tmp_path, where, name, value)
        response = rest(data)
        assert 400 <= response.status_code < 500, (name, value, response.status_code, response.text[:300])
        assert name in response.text, (name, value, response.text[:300])


@pytest.mark.gradio
def test_nul_bytes_and_absurd_values_of_the_review_through_the_rest_route(rest, tmp_path):
    for key, value in {
        "pretrained_model_name_or_path": str(tmp_path / "m\0.safetensors"),
        "model_name": "a\0b",
        "resolution": 10**400,
        "max_train_steps": 10**20,
    }.items():
        data = valid_dict(tmp_path)
        data[key] = value
        response = rest(data)
        assert response.status_code == 422 and key in response.text, (key, response.status_code, response.text[:300])


# ---------------------------------------------------------------------------------- item 19 and prompt lengths


def standard_arch(family: str, prediction: str):
    """The architecture of a released SD 1.x / 2.x model (only the sizes matter here; no weights)."""
    from dreambooth.models.architecture import Architecture

    width = 768 if family == "sd1" else 1024
    return Architecture(
        family=family,
        prediction_type=prediction,
        unet={"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": width, "in_channels": 4},
        vae={"block_out_channels": [128, 256, 512, 512]},
        text={"hidden_size": width},
        text_blocks_in_file=24,
    )


def test_a_768_v_model_trained_at_512_is_warned_about():
    v_model = standard_arch("sd2", "v_prediction")
    (warning,) = validation.resolution_warnings(Settings(resolution=512), v_model)
    assert "resolution is 512" in warning and "768" in warning and "SD 2.x 768 (v-prediction)" in warning
    assert validation.resolution_warnings(Settings(resolution=768), v_model) == []
    assert validation.resolution_warnings(Settings(resolution=512), standard_arch("sd2", "epsilon")) == []
    assert validation.resolution_warnings(Settings(resolution=512), standard_arch("sd1", "epsilon")) == []


def test_sdxl_will_be_warned_about_below_1024():
    class Sdxl:  # what an SDXL architecture will answer; the table already knows its resolution
        family, name, is_standard_size, is_v_prediction = "sdxl", "SDXL", True, False

    assert validation.resolution_warnings(Settings(resolution=768), Sdxl())
    assert validation.resolution_warnings(Settings(resolution=1024), Sdxl()) == []


def test_prompts_longer_than_clip_reads_are_warned_about_with_their_token_count():
    settings = Settings(
        concepts=[Concept(instance_prompt="photo of zwx dog, " * 20, class_prompt="photo of a dog")],
        save_sample_prompt="a b c",
    )
    (warning,) = validation.prompt_warnings(settings, lambda text: len(text.split()))
    assert warning.startswith("concept 1: instance_prompt is 80 CLIP tokens long; only the first 75 are used")


@pytest.mark.slow
def test_the_trainer_logs_the_warnings_once_the_model_is_known(make_settings, monkeypatch):
    from dreambooth.events import Callbacks
    from dreambooth.train.loop import Trainer

    class Log(Callbacks):
        def __init__(self):
            self.lines = []

        def on_log(self, message):
            self.lines.append(message)

    monkeypatch.setattr(validation, "native_resolution", lambda arch: 768)  # the tiny model is no released size
    log = Log()
    settings = make_settings(max_train_steps=1, concept={"instance_prompt": "photo of zwx ring on a table, " * 12})
    Trainer(settings, callbacks=log).run()
    warnings = [line for line in log.lines if line.startswith("warning: ")]
    assert any("resolution is 64" in w and "768" in w for w in warnings), log.lines
    assert any("concept 1: instance_prompt is 108 CLIP tokens long" in w for w in warnings), log.lines  # 12 x 9


@pytest.mark.gradio
@pytest.mark.parametrize(
    "body",
    ["[" * 100_000 + "]" * 100_000, '{"resolution": 1' + "0" * 5000 + "}", "[1, 2]", "nonsense", '"text"'],
    ids=["deep", "5000 digits", "a list", "not JSON", "a string"],
)
def test_bodies_that_are_no_settings_object_are_4xx(rest, body):
    assert 400 <= rest(body=body).status_code < 500


def test_a_stale_resume_from_is_refused_with_what_to_do(tmp_path):
    """Seen in the real WebUI: the tab restores the last Train's settings, resume_from included (in a closed
    accordion), so a new run -- another name, another base model, 20 steps -- "resumed" another run's state at step
    160 and "finished at step 160 of 20" without training or writing anything."""
    state = tmp_path / "runs" / "ring3" / "state"
    state.mkdir(parents=True)
    info = {"version": 1, "step": 160, "modules": ["unet"], "model_name": "ring3"}
    (state / "state.json").write_text(json.dumps(info))
    for name in ("unet.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt"):  # a complete state (find_state)
        (state / name).write_bytes(b"only its presence is checked here")
    data = valid_dict(tmp_path)
    data.update(model_name="ring-ckpt", max_train_steps=20, resume_from=str(state))
    problems = [p for p in problems_of(data) if p.startswith("resume_from")]
    stale = ("step 160", "max_train_steps is 20", "clear resume_from")
    assert any(all(part in p for part in stale) for p in problems), problems
    assert any("'ring3'" in p and "'ring-ckpt'" in p and "model_name" in p for p in problems), problems
    data.update(model_name="ring3", max_train_steps=200)
    assert not [p for p in problems_of(data) if p.startswith("resume_from")]  # continuing that run is fine
