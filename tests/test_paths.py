"""The one path policy (dreambooth/paths.py) and the host's checks: what a request may read, what it may write.

Issue 12 item 13: a class folder the trainer would write class images into counts as a write; item 29: every
refusal names the folders and the setting that allows more.
"""

from __future__ import annotations

import dataclasses

import pytest
from conftest import draw_subject

from dreambooth.host import Host
from dreambooth.runner import Runner
from dreambooth.settings import SettingsError

WAIT_SECONDS = 120


@pytest.fixture
def host(tmp_path, tiny_checkpoint):
    """Reads tmp_path (standing for the user's home) and the model's folder; writes only its own folders."""
    return Host(tmp_path / "models", allowed_roots=[tmp_path, tiny_checkpoint("sd1").parent])


def test_the_policy_reads_under_read_and_write_roots_and_writes_under_write_roots_only(tmp_path):
    from dreambooth.paths import PathPolicy

    home, out = tmp_path / "home", tmp_path / "out"
    policy = PathPolicy(read_roots=(home,), write_roots=(out,), read_hint="use --allow", write_hint="use --w")
    assert policy.check_read(home / "set", "instance_data_dir") == ""
    assert policy.check_read(out / "run" / "x.png", "f") == ""  # what may be written may be read
    assert policy.check_write(out / "run", "output_dir") == ""
    refused = policy.check_write(home / "class", "class_data_dir", "3 class images would be generated there")
    assert refused == (
        f"class_data_dir: '{home / 'class'}' is outside the folders this server may write to (3 class images would "
        f"be generated there): {out.resolve()}; choose a folder inside one of them, or use --w."
    )
    assert policy.check_write(out / ".." / "home", "dst")  # '..' cannot lead outside
    (out).mkdir()
    (out / "link").symlink_to(home)
    assert policy.check_write(out / "link" / "x", "dst")  # nor can a link
    refused = policy.check_read("/etc/passwd", "test_prompts_file")
    assert refused.startswith("test_prompts_file: '/etc/passwd' is outside the folders this server may read (")
    assert str(home.resolve()) in refused and str(out.resolve()) in refused and refused.endswith("use --allow.")
    assert "not a usable path" in policy.check_read("bad\0name", "instance_data_dir")  # a sentence, not a crash


def test_a_class_folder_outside_the_write_roots_is_refused_before_anything_is_written(host, make_settings, tmp_path):
    """A readable folder is not a writable one: with prior preservation and class images missing, the job would
    write them there, so it does not start, and the folder is not even created."""
    settings = host.prepare(make_settings(with_prior_preservation=True, num_class_images=2))
    assert settings.concepts[0].class_data_dir == str(tmp_path / "class")  # readable: under an allowed root
    runner = Runner(host)
    with pytest.raises(SettingsError) as error:
        runner.start(settings)
    [problem] = [p for p in error.value.problems if p.startswith("concept 1 class_data_dir")]
    assert "may write to (2 missing class image(s) would be generated there)" in problem
    assert str(host.checkpoint_dir) in problem and str(host.data_dir) in problem and "--allow-write" in problem
    assert str(host.lora_dir) in problem  # the README's promise: the checkpoint, Lora and own folders, no other
    assert runner.snapshot().state == "idle" and not (tmp_path / "class").exists()


def test_a_complete_class_folder_is_only_read(host, make_settings, tmp_path):
    draw_subject(tmp_path / "class", count=2)  # the user's own regularisation images, enough of them
    settings = host.prepare(make_settings(with_prior_preservation=True, num_class_images=2))
    assert host.check_settings(settings) == []
    more = host.prepare(make_settings(with_prior_preservation=True, num_class_images=3))
    assert any("1 missing class image(s)" in p for p in host.check_settings(more))


def test_write_roots_allow_class_folders_and_an_empty_one_is_made_in_the_run_folder(
    make_settings, tmp_path, tiny_checkpoint
):
    roots = [tmp_path, tiny_checkpoint("sd1").parent]
    writer = Host(tmp_path / "models", allowed_roots=roots, write_roots=[tmp_path / "class"])
    settings = writer.prepare(make_settings(with_prior_preservation=True, num_class_images=2))
    assert writer.check_settings(settings) == []
    host = Host(tmp_path / "models", allowed_roots=roots)
    empty = host.prepare(make_settings(with_prior_preservation=True, concept={"class_data_dir": ""}))
    assert empty.concepts[0].class_data_dir == str(host.run_dir(empty.model_name) / "class_images_1")
    assert host.check_settings(empty) == []


def test_a_job_with_an_empty_class_folder_generates_its_class_images_in_the_run_folder(host, make_settings, tmp_path):
    settings = host.prepare(
        make_settings(
            with_prior_preservation=True, num_class_images=2, max_train_steps=1, concept={"class_data_dir": ""}
        )
    )
    runner = Runner(host)
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS)
    assert runner.snapshot().state == "finished", runner.snapshot().error
    made = sorted(p.name for p in (host.run_dir(settings.model_name) / "class_images_1").glob("*.png"))
    assert len(made) == 2 and all(name.startswith("class-") for name in made)
    assert not (tmp_path / "class").exists()


def test_every_path_a_job_reads_is_checked_with_the_same_sentence(host, make_settings, tmp_path):
    settings = host.prepare(
        make_settings(
            test_prompts_file="/etc/passwd",
            concept={"instance_data_dir": "/etc", "class_data_dir": "/", "validation_data_dir": "/var"},
        )
    )
    problems = host.check_settings(settings)
    policy = host.paths
    for field, path in (
        ("test_prompts_file", "/etc/passwd"),
        ("concept 1 instance_data_dir", "/etc"),
        ("concept 1 class_data_dir", "/"),
        ("concept 1 validation_data_dir", "/var"),
    ):
        assert policy.check_read(path, field) in problems
    assert all("DREAMBOOTH_ALLOWED_ROOTS" in p and "--allow DIR" in p for p in problems if "may read" in p)
    # what lies outside the allowed folders is not probed: no "no images in '/etc'", no "does not exist"
    assert not any(("/etc'" in p or "/var'" in p) and "outside" not in p for p in problems), problems
    hidden = host.prepare(make_settings(pretrained_model_name_or_path="/no/such/model.safetensors"))
    assert [p for p in host.check_settings(hidden) if "/no/such" in p] == [
        host.paths.check_read("/no/such/model.safetensors", "pretrained_model_name_or_path")
    ]


def test_lora_files_go_to_the_hosts_lora_folder_and_nowhere_else(host, make_settings, tmp_path):
    """Issue 14: the tab's jobs write LoRA files into the Lora folder (``DIR/Lora`` here, the WebUI's ``--lora-dir``
    there), a write root of its own; a request naming another folder is refused before anything is written."""
    settings = host.prepare(make_settings(lora_dir=str(tmp_path / "elsewhere")))
    assert settings.lora_dir == str(tmp_path / "models" / "Lora") == str(host.lora_dir)
    assert host.paths.may_write(host.lora_dir / "ring_2.safetensors")
    assert host.check_settings(settings) == []
    for wanted in (str(tmp_path / "elsewhere"), "../../../../escape"):  # absolute; relative to output_dir
        refused = host.check_settings(dataclasses.replace(settings, lora_dir=wanted))
        [problem] = [p for p in refused if p.startswith("lora_dir:")]
        assert "outside the folders this server may write to" in problem and str(host.lora_dir) in problem
    assert not (tmp_path / "elsewhere").exists()


def test_a_lora_model_name_the_prompt_tag_cannot_say_is_refused(host, make_settings, tmp_path):
    """Issue 14: the WebUI names a LoRA by its file stem, NAME_STEP, in ``<lora:NAME:WEIGHT>``: a model name with
    ':', '>' or '=' is refused before the run, in one sentence; a full run may keep such a name."""
    for name in ("ring:v2", "a>b", "x=y"):
        refused = host.check_settings(host.prepare(make_settings(training_method="lora", model_name=name)))
        [problem] = [p for p in refused if p.startswith("model_name:")]
        assert f"'{name}' cannot name a LoRA" in problem and "`<lora:NAME:WEIGHT>`" in problem
    assert host.check_settings(host.prepare(make_settings(training_method="lora", model_name="ring_v2"))) == []
    outside = tmp_path.parent / "elsewhere.safetensors"  # network_init_from is read: under the read roots only
    refused = host.check_settings(host.prepare(make_settings(training_method="lora", network_init_from=str(outside))))
    assert any(p.startswith("network_init_from:") and "outside the folders" in p for p in refused)
