"""Checkpoints shaped like the ones people have: the original SD 1.x ``.ckpt`` (lightning callbacks, a numpy
``global_step``, optimizer states, an EMA copy), refused pickles in every place we read one, other model families.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from dreambooth.errors import DreamBoothError, ModelFileError
from dreambooth.models.components import load_components, load_vae
from dreambooth.models.files import read_state_dict

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = "pytorch_lightning.callbacks.model_checkpoint"


@contextlib.contextmanager
def fake_lightning():
    """pytorch-lightning is not installed: a module of its name, only while a test file is written."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING]
    modules = {name: types.ModuleType(name) for name in names}

    class ModelCheckpoint:  # the class object is a key of ``callbacks`` in lightning 1.4 checkpoints
        pass

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = LIGHTNING, "ModelCheckpoint"
    modules[LIGHTNING].ModelCheckpoint = ModelCheckpoint
    modules["pytorch_lightning.callbacks"].model_checkpoint = modules[LIGHTNING]
    saved = {name: sys.modules.get(name) for name in names}
    sys.modules.update(modules)
    try:
        yield ModelCheckpoint
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def ema_copy(state_dict: dict) -> dict:
    """ldm's EMA of the UNet as the released v1-5-pruned.ckpt holds it: names without dots, plus decay/updates."""
    unet = "model.diffusion_model."
    ema = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32)}
    for key, tensor in state_dict.items():
        if key.startswith(unet):
            ema["model_ema.diffusion_model" + key[len(unet) :].replace(".", "")] = tensor.clone()
    return ema


def write_release_ckpt(path: Path, state_dict: dict, zip_format: bool, extra: dict | None = None) -> Path:
    """A ``.ckpt`` with the structure of the original SD 1.x release (lightning 1.4.2 training checkpoint)."""
    weights = dict(state_dict)
    first = next(iter(weights.values()))
    with fake_lightning() as model_checkpoint:
        checkpoint = {
            "epoch": 6,
            "global_step": np.int64(470000),
            "pytorch-lightning_version": "1.4.2",
            "callbacks": {
                model_checkpoint: {
                    "monitor": None,
                    "best_model_score": None,
                    "best_model_path": "/fsx/stable-diffusion/logs/checkpoints/last.ckpt",
                    "current_score": None,
                    "dirpath": "/fsx/stable-diffusion/logs/checkpoints",
                    "kth_value": np.array([0.125, 0.25]),
                    "save_keys": {"epoch", "step"},
                }
            },
            "optimizer_states": [
                {
                    "state": {0: {"step": 470000, "exp_avg": torch.zeros_like(first)}},
                    "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0]}],
                }
            ],
            "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 470000, "_step_count": 470001, "lr_lambdas": [None]}],
            "state_dict": weights,
            **(extra or {}),
        }
        torch.save(checkpoint, path, _use_new_zipfile_serialization=zip_format)
    if not zip_format:
        # The released files were written with numpy 1 (``numpy.core``); numpy 2 writes ``numpy._core``.
        path.write_bytes(path.read_bytes().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n"))
    return path


def pickle_bytes(path: Path) -> bytes:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    except zipfile.BadZipFile:
        return path.read_bytes()


@pytest.fixture
def release_ckpt(tiny_checkpoint, tmp_path):
    """``release_ckpt(zip_format, ema=True)`` -> an SD 1.x-release-shaped tiny .ckpt (with its sidecar yaml)."""

    def make(zip_format: bool = True, ema: bool = True, name: str = "sd-v1-4") -> Path:
        state_dict, _ = read_state_dict(tiny_checkpoint("sd1"))
        if ema:
            state_dict.update(ema_copy(state_dict))
        path = write_release_ckpt(tmp_path / f"{name}.ckpt", state_dict, zip_format)
        shutil.copy(tiny_checkpoint("sd1").with_suffix(".yaml"), path.with_suffix(".yaml"))
        return path

    return make


class Payload:
    """Unpickling this runs a shell command that creates ``marker``: it must never run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def assert_one_line_refusal(error: BaseException, path: Path) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert str(path) in message, message
    assert "weights_only" not in message and "add_safe_globals" not in message, message


# ------------------------------------------------------------------------------------------ item 1: real .ckpt


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_original_sd1_ckpt_loads_with_the_webui_allow_list(release_ckpt, tiny_checkpoint, zip_format):
    path = release_ckpt(zip_format)
    data = pickle_bytes(path)  # the test file really names what the released files name
    assert b"pytorch_lightning.callbacks.model_checkpoint\nModelCheckpoint" in data
    assert b"multiarray\nscalar" in data and b"multiarray\n_reconstruct" in data and b"set" in data
    if not zip_format:
        assert b"numpy.core.multiarray\nscalar" in data
    components = load_components(path)
    assert components.arch.family == "sd1"
    original, _ = read_state_dict(tiny_checkpoint("sd1"))
    unet = components.unet.state_dict()
    assert torch.equal(unet["conv_in.weight"], original["model.diffusion_model.input_blocks.0.0.weight"])


def test_the_test_ckpt_is_inside_the_webui_rules(release_ckpt):
    """The legacy test file passes AUTOMATIC1111's own restricted unpickler: it asks for nothing beyond its list."""
    from tests.test_webui_ckpt import check_like_the_webui

    with fake_lightning():
        check_like_the_webui(release_ckpt(zip_format=False))


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(lambda marker: {"x": Payload(marker)}, id="os.system"),
        pytest.param(lambda marker: {"x": np.random.default_rng}, id="numpy-function-off-the-list"),
        pytest.param(lambda marker: {"x": torch.nn.Linear}, id="torch-class-off-the-list"),
    ],
)
def test_globals_beyond_the_webui_list_are_refused(tiny_checkpoint, tmp_path, extra):
    marker = tmp_path / "payload-ran"
    state_dict, _ = read_state_dict(tiny_checkpoint("sd1"))
    path = write_release_ckpt(tmp_path / "evil.ckpt", state_dict, zip_format=True, extra=extra(marker))
    with pytest.raises(ModelFileError, match="refused to load") as error:
        load_components(path)
    assert_one_line_refusal(error.value, path)
    assert not marker.exists()


def test_loading_leaves_torch_allow_list_as_it_was(release_ckpt):
    before = list(torch.serialization.get_safe_globals())
    load_components(release_ckpt())
    after = list(torch.serialization.get_safe_globals())  # torch keeps the list in a set: its order varies
    assert len(after) == len(before) and set(after) == set(before)
    with pytest.raises(Exception, match=r"(?i)unsupported global|not an allowed global"):
        torch.load(release_ckpt(name="again"), weights_only=True)  # a plain torch.load still refuses it


def test_a_torch_without_named_allow_list_entries_refuses_clearly(release_ckpt, tiny_checkpoint, tmp_path, monkeypatch):
    """torch < 2.6 cannot name the extras: plain-tensor files still load, a release .ckpt says which torch would."""
    from dreambooth.models import safe_pickle

    monkeypatch.setattr(safe_pickle, "can_name_globals", lambda: False)
    path = release_ckpt()
    with pytest.raises(ModelFileError, match=r"torch 2\.6\+ can") as error:
        load_components(path)
    assert_one_line_refusal(error.value, path)
    state_dict, _ = read_state_dict(tiny_checkpoint("sd1"))
    plain = tmp_path / "plain.ckpt"
    torch.save({"state_dict": state_dict}, plain)
    assert safe_pickle.load_pickle(plain)["state_dict"].keys() == state_dict.keys()


def test_the_feature_probe_does_not_call_torch_load(monkeypatch):
    """Inside the WebUI torch.load is its checker, which would refuse (and loudly report) the probe's own file."""
    from dreambooth.models import safe_pickle

    def replaced(*args, **kwargs):
        raise AssertionError("torch.load called by the probe")

    monkeypatch.setattr(torch, "load", replaced)
    safe_pickle.can_name_globals.cache_clear()
    try:
        assert safe_pickle.can_name_globals()  # torch 2.6+ in both test environments
    finally:
        safe_pickle.can_name_globals.cache_clear()


# ---------------------------------------------------------------------- item 2: refused in one line everywhere


def _diffusers_folder(tiny_checkpoint, tmp_path) -> Path:
    from dreambooth.models.components import save_diffusers_folder

    return save_diffusers_folder(load_components(tiny_checkpoint("sd1")), tmp_path / "diffusers")


def _evil(path: Path, marker: Path) -> Path:
    torch.save({"weight": torch.zeros(1), "x": Payload(marker)}, path)
    return path


def _single_file(tiny_checkpoint, tmp_path, marker):
    evil = _evil(tmp_path / "model.ckpt", marker)
    return lambda: load_components(evil), evil


def _folder_component(tiny_checkpoint, tmp_path, marker, part="unet", name="diffusion_pytorch_model.bin"):
    folder = _diffusers_folder(tiny_checkpoint, tmp_path)
    for weights in (folder / part).glob("*.safetensors"):
        weights.unlink()
    evil = _evil(folder / part / name, marker)
    return lambda: load_components(folder), evil


def _folder_vae(tiny_checkpoint, tmp_path, marker):
    return _folder_component(tiny_checkpoint, tmp_path, marker, "vae")


def _folder_text_encoder(tiny_checkpoint, tmp_path, marker):
    return _folder_component(tiny_checkpoint, tmp_path, marker, "text_encoder", "pytorch_model.bin")


def _vae_file(tiny_checkpoint, tmp_path, marker):
    evil = _evil(tmp_path / "vae.ckpt", marker)
    arch = load_components(tiny_checkpoint("sd1")).arch
    return lambda: load_vae(evil, arch), evil


def _vae_folder(tiny_checkpoint, tmp_path, marker):
    components = load_components(tiny_checkpoint("sd1"))
    folder = tmp_path / "vae"
    components.vae.save_pretrained(str(folder))
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    evil = _evil(folder / "diffusion_pytorch_model.bin", marker)
    return lambda: load_vae(folder, components.arch), evil


PLACES = {
    "single-file": _single_file,
    "folder-unet": _folder_component,
    "folder-vae": _folder_vae,
    "folder-text-encoder": _folder_text_encoder,
    "vae-file": _vae_file,
    "vae-folder": _vae_folder,
}


@pytest.mark.parametrize("place", list(PLACES))
def test_malicious_pickle_is_refused_in_one_line_wherever_we_read_one(tiny_checkpoint, tmp_path, place):
    marker = tmp_path / "payload-ran"
    load, evil = PLACES[place](tiny_checkpoint, tmp_path, marker)
    with pytest.raises(DreamBoothError, match="refused to load") as error:
        load()
    assert_one_line_refusal(error.value, evil)
    assert not marker.exists()


@pytest.mark.slow
def test_malicious_training_state_is_refused_in_one_line(make_settings, tmp_path):
    from dreambooth.train.loop import Trainer

    first = Trainer(make_settings(max_train_steps=1, output_dir=str(tmp_path / "first"))).run()
    marker = tmp_path / "payload-ran"
    evil = _evil(Path(first.state_dir) / "optimizer.pt", marker)
    resumed = make_settings(max_train_steps=2, output_dir=str(tmp_path / "second"), resume_from=str(first.state_dir))
    with pytest.raises(DreamBoothError, match="refused to load") as error:
        Trainer(resumed).run()
    assert_one_line_refusal(error.value, evil)
    assert not marker.exists()


def test_diffusers_folder_with_pickled_weights_loads_the_same_weights(tiny_checkpoint, tmp_path):
    """Older folders hold .bin weights: read by our loader, they give exactly the safetensors folder's modules."""
    from safetensors.torch import load_file

    folder = _diffusers_folder(tiny_checkpoint, tmp_path)
    reference = load_components(folder)
    for part, stem, name in (
        ("unet", "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
        ("vae", "diffusion_pytorch_model", "diffusion_pytorch_model.bin"),
        ("text_encoder", "model", "pytorch_model.bin"),
    ):
        weights = folder / part / f"{stem}.safetensors"
        torch.save(load_file(str(weights)), folder / part / name)
        weights.unlink()
    loaded = load_components(folder)
    for module in ("unet", "vae", "text_encoder"):
        expected, got = getattr(reference, module).state_dict(), getattr(loaded, module).state_dict()
        assert set(expected) == set(got), module
        assert all(torch.equal(expected[k], got[k]) for k in expected), module


# ------------------------------------------------------------------------------------------ item 3: stale EMA


@pytest.mark.parametrize("kind", ["safetensors", "release-ckpt"])
def test_base_ema_is_dropped_from_outputs_and_the_log_says_so(
    release_ckpt, tiny_checkpoint, make_settings, tmp_path, kind
):
    from safetensors.torch import save_file

    from dreambooth.events import Callbacks
    from dreambooth.train.loop import Trainer

    if kind == "release-ckpt":
        base = release_ckpt()
    else:  # a pruned-with-EMA .safetensors (as v1-5-pruned converted), read by safetensors: only the EMA matters
        state_dict, metadata = read_state_dict(tiny_checkpoint("sd1"))
        base = tmp_path / "v1-5-pruned.safetensors"
        save_file({**state_dict, **ema_copy(state_dict)}, str(base), metadata=metadata)
        shutil.copy(tiny_checkpoint("sd1").with_suffix(".yaml"), base.with_suffix(".yaml"))
    ema_keys = {k for k in read_state_dict(base)[0] if k.startswith("model_ema.")}
    assert len(ema_keys) > 2

    class Log(Callbacks):
        def __init__(self):
            self.lines = []

        def on_log(self, message):
            self.lines.append(message)

    log = Log()
    result = Trainer(make_settings(pretrained_model_name_or_path=str(base)), callbacks=log).run()
    written, _ = read_state_dict(result.checkpoints[-1])
    assert not [k for k in written if k.startswith("model_ema.")]
    assert f"dropped {len(ema_keys)} EMA tensors (model_ema.*) of the base file: they were not trained" in log.lines


# ------------------------------------------------------------------------------------ item 5: other families


def _sdxl_folder(tiny_checkpoint, tmp_path, with_index: bool = True) -> Path:
    """An SDXL diffusers folder as other tools write it (no record of ours), with or without model_index.json."""
    from dreambooth.models.components import save_diffusers_folder

    folder = save_diffusers_folder(load_components(tiny_checkpoint("sdxl")), tmp_path / "sdxl")
    (folder / "dreambooth.json").unlink()
    if not with_index:
        (folder / "model_index.json").unlink()
    return folder


@pytest.mark.parametrize("with_index", [True, False], ids=["model_index", "layout-only"])
def test_sdxl_folder_loads_and_is_accepted_for_training(tiny_checkpoint, make_settings, tmp_path, with_index):
    """Recognised from its layout (text_encoder_2/, the UNet's addition_embed_type), never taken for SD 1.x; SDXL
    trains (tests/test_sdxl_train.py), so validation has nothing to say about the family."""
    folder = _sdxl_folder(tiny_checkpoint, tmp_path, with_index)
    problems = make_settings(pretrained_model_name_or_path=str(folder)).validate()
    assert not any("SDXL" in p for p in problems), problems
    assert load_components(folder).arch.family == "sdxl"


def test_transformer_folder_is_refused_by_family(tmp_path, make_settings):
    import json

    folder = tmp_path / "sd3"
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "scheduler"):
        (folder / part).mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline"}))
    problems = make_settings(pretrained_model_name_or_path=str(folder)).validate()
    assert any("the model is SD3" in p and "not supported yet" in p for p in problems), problems
    (folder / "model_index.json").unlink()
    with pytest.raises(ModelFileError, match=r"transformer/ instead of unet/.*not supported yet"):
        load_components(folder)


def test_sdxl_single_file_is_accepted_in_validation(tiny_checkpoint, make_settings):
    problems = make_settings(pretrained_model_name_or_path=str(tiny_checkpoint("sdxl"))).validate()
    assert problems == [], problems


# -------------------------------------------------------------------------------------------------- the CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dreambooth", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_info_and_train_on_an_original_sd1_ckpt(release_ckpt, make_settings, tmp_path):
    base = release_ckpt(zip_format=True)
    result = run_cli("info", str(base))
    assert result.returncode == 0, result.stderr
    assert "SD 1.x" in result.stdout
    config = make_settings(pretrained_model_name_or_path=str(base), output_dir=str(tmp_path / "out")).save(
        tmp_path / "settings.json"
    )
    result = run_cli("train", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert "finished at step 2 of 2" in result.stdout
    assert "EMA tensors (model_ema.*) of the base file" in result.stdout + result.stderr
    written, _ = read_state_dict(tmp_path / "out" / "dreambooth_2.safetensors")
    assert "model.diffusion_model.out.2.weight" in written and not any(k.startswith("model_ema.") for k in written)


@pytest.mark.slow
def test_cli_refuses_a_malicious_folder_in_one_line(tiny_checkpoint, tmp_path):
    marker = tmp_path / "payload-ran"
    _, evil = _folder_component(tiny_checkpoint, tmp_path, marker)
    result = run_cli("info", str(tmp_path / "diffusers"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(evil) in lines[0] and "refused to load" in lines[0], result.stderr
    assert not marker.exists()
