"""The WebUI glue against a fake of the WebUI v1.10.1 API (tests/fake_webui): registration, the queue lock, the
loaded model's GPU memory, Interrupt, outputs and the checkpoint list, model switching, REST auth, coexistence."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import shutil
import sys
import threading
import time
import types
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gradio

ROOT = Path(__file__).resolve().parents[1]
FAKE = Path(__file__).resolve().parent / "fake_webui"
WAIT_SECONDS = 120
FAKE_NAMES = ("modules", "launch", "networks")


def _purge_fake() -> None:
    for name in list(sys.modules):
        if name.split(".")[0] in FAKE_NAMES:
            del sys.modules[name]


def wait_for(condition, timeout=WAIT_SECONDS):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def webui(tmp_path, tiny_checkpoint, monkeypatch):
    """A fresh fake WebUI with a tiny model (``webui(variant="sdxl")``; default SD 1.x) in models/Stable-diffusion as
    base.safetensors, loaded as the current model."""
    _purge_fake()
    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.setenv("DREAMBOOTH_ALLOWED_ROOTS", str(tmp_path))
    monkeypatch.setenv("DREAMBOOTH_DATA_DIR", str(tmp_path / "extension-data"))
    from modules import fake, paths

    def start(variant="sd1", **cmd_opts):
        fake.reset(tmp_path / "webui", **cmd_opts)
        folder = Path(paths.models_path) / "Stable-diffusion"
        folder.mkdir(parents=True, exist_ok=True)
        source = tiny_checkpoint(variant)
        target = folder / "base.safetensors"
        shutil.copy(source, target)
        shutil.copy(source.with_suffix(".yaml"), folder / "base.yaml")
        model = fake.load_checkpoint(target)
        fake.calls.clear()  # what the start-up did is not what the tests look at
        import dreambooth.webui as glue

        glue._state.clear()
        return types.SimpleNamespace(fake=fake, model=model, base=target, folder=folder, glue=glue)

    yield start
    from modules import call_queue

    assert not call_queue.queue_lock.locked(), "a test left the WebUI's queue lock held"
    import dreambooth.webui as glue

    glue._state.clear()
    _purge_fake()


def settings_for(w, make_settings, **changes):
    runner = w.glue.runner()
    changes.setdefault("pretrained_model_name_or_path", str(w.base))
    return runner, runner.host.prepare(make_settings(**changes))


def test_the_tab_and_the_routes_are_registered(webui):
    w = webui()
    w.glue.register()
    from modules import script_callbacks

    tabs = script_callbacks.registered_ui_tabs()
    assert len(tabs) == 1
    [(_blocks, title, elem_id)] = tabs[0]()
    assert (title, elem_id) == ("DreamBooth", "dreambooth_tab")
    assert "on_app_started" in str(script_callbacks.registered("app_started"))


def test_a_job_holds_the_queue_lock_and_the_gpu_is_freed_then_given_back(webui, make_settings):
    w = webui()
    from modules import call_queue, shared

    runner, settings = settings_for(w, make_settings, max_train_steps=400)
    assert w.model.location == "cuda"
    runner.start(settings)
    assert wait_for(lambda: runner.snapshot().losses)
    assert call_queue.queue_lock.locked()  # txt2img would wait
    assert w.model.location == "cpu"  # its VRAM is free for training
    assert shared.state.job == "dreambooth"
    assert shared.state.sampling_steps == 400 and shared.state.sampling_step >= 1
    runner.cancel()
    assert runner.wait(WAIT_SECONDS)
    assert not call_queue.queue_lock.locked()
    assert w.model.location == "cuda"
    names = w.fake.call_names()
    assert names.index("sd_models.send_model_to_cpu") < names.index("sd_models.send_model_to_device")
    assert shared.state.job == ""


def test_after_a_failure_the_model_and_the_lock_are_given_back(webui, make_settings, monkeypatch):
    w = webui()
    from modules import call_queue

    from dreambooth.train.loop import Trainer

    def explode(self):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(Trainer, "run", explode)
    runner, settings = settings_for(w, make_settings)
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS)
    snap = runner.snapshot()
    assert snap.state == "failed" and "out of memory" in snap.error
    assert not call_queue.queue_lock.locked() and w.model.location == "cuda"


def test_the_webui_interrupt_button_cancels_the_job(webui, make_settings):
    w = webui()
    from modules import shared

    runner, settings = settings_for(w, make_settings, max_train_steps=400)
    runner.start(settings)
    assert wait_for(lambda: runner.snapshot().losses)
    shared.state.interrupt()
    assert runner.wait(WAIT_SECONDS)
    assert runner.snapshot().state == "cancelled" and runner.snapshot().progress.step < 400


def test_the_output_lands_in_the_checkpoint_folder_and_the_list_is_refreshed(webui, make_settings):
    w = webui()
    from modules import sd_models

    runner, settings = settings_for(w, make_settings, model_name="ring")
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS) and runner.snapshot().state == "finished"
    output = w.folder / "ring_2.safetensors"
    assert output.is_file() and (w.folder / "ring_2.yaml").is_file()
    assert runner.snapshot().checkpoints == (str(output),)
    assert str(output) in [info.filename for info in sd_models.checkpoints_list.values()]


def test_ckpt_dir_is_honoured(webui, make_settings, tmp_path):
    w = webui(ckpt_dir=str(tmp_path / "my-models"))
    runner, settings = settings_for(w, make_settings, model_name="ring")
    assert settings.checkpoint_dir == str(tmp_path / "my-models")
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS) and runner.snapshot().state == "finished"
    assert (tmp_path / "my-models" / "ring_2.safetensors").is_file()


def test_lora_dir_is_the_lora_extensions_folder(webui, make_settings, tmp_path):
    """Issue 14: LoRA files go where the built-in Lora extension scans: ``--lora-dir`` (read live), else
    ``models/Lora``; the path policy lets jobs write there."""
    w = webui()
    from modules import paths, shared

    host = w.glue.runner().host
    assert host.lora_dir == Path(paths.models_path) / "Lora"
    shared.cmd_opts.lora_dir = str(tmp_path / "my-loras")
    assert host.lora_dir == tmp_path / "my-loras"
    _, settings = settings_for(w, make_settings, model_name="ring")
    assert settings.lora_dir == str(tmp_path / "my-loras")
    assert host.paths.may_write(tmp_path / "my-loras" / "ring_2.safetensors") and host.check_settings(settings) == []
    shared.cmd_opts.lora_dir = None  # the Lora extension disabled: its preload never ran
    assert host.lora_dir == Path(paths.models_path) / "Lora"


def test_use_in_txt2img_switches_and_checks_the_switch(webui, make_settings):
    w = webui()
    from modules import sd_models

    runner, settings = settings_for(w, make_settings, model_name="ring")
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS)
    output = runner.snapshot().checkpoints[0]
    done, message = runner.host.use_checkpoint(output)
    assert done, message
    assert sd_models.model_data.sd_model.sd_checkpoint_info.filename == output

    # a switch the WebUI reports as done but that did not happen is caught, and the previous model comes back
    done, _ = runner.host.use_checkpoint(str(w.base))
    assert done
    sd_models.faults.ignore_switch = True
    done, message = runner.host.use_checkpoint(output)
    assert not done and "another model" in message
    assert sd_models.model_data.sd_model.sd_checkpoint_info.filename == str(w.base)


def test_the_refresh_after_a_job_keeps_the_users_model_choice(webui, make_settings):
    """With --ckpt given, the WebUI's list_models() resets the model option to that file; ours must not."""
    from modules import shared

    w = webui()
    shared.cmd_opts.ckpt = str(w.base)
    runner, settings = settings_for(w, make_settings, model_name="ring")
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS)
    output = runner.snapshot().checkpoints[0]
    done, _ = runner.host.use_checkpoint(output)
    assert done
    chosen = shared.opts.data["sd_model_checkpoint"]
    assert "ring_2" in chosen
    runner.start(dataclasses.replace(settings, model_name="again"))  # its end refreshes the list
    assert runner.wait(WAIT_SECONDS)
    assert shared.opts.data["sd_model_checkpoint"] == chosen


def test_no_switch_while_a_job_runs(webui, make_settings):
    w = webui()
    runner, settings = settings_for(w, make_settings, max_train_steps=400)
    runner.start(settings)
    assert wait_for(lambda: runner.snapshot().losses)
    done, message = runner.host.use_checkpoint(str(w.base))
    assert not done and "training job" in message
    runner.cancel()
    assert runner.wait(WAIT_SECONDS)


def _final_unet(runner):
    from dreambooth.models.files import read_state_dict

    tensors, _ = read_state_dict(runner.snapshot().checkpoints[-1])
    return {k: v for k, v in tensors.items() if k.startswith("model.diffusion_model.")}


def test_the_weights_taken_from_memory_are_exactly_the_files(webui):
    w = webui(no_half=True)
    from dreambooth.models.components import load_components

    host = w.glue.runner().host
    assert host._memory_is_clean(w.model, str(w.base)) == ""
    memory, disk = host._components_from_memory(w.model, str(w.base)), load_components(w.base)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(memory, name).state_dict(), getattr(disk, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert memory.extras.keys() == disk.extras.keys()  # not the schedule buffers the WebUI's model computes
    assert memory.arch == disk.arch


def test_the_sdxl_weights_taken_from_memory_are_exactly_the_files(webui):
    """Issue 15: the WebUI's loaded SDXL model (sgm's DiffusionEngine, hijacked) holds each text-encoder tensor twice
    (``conditioner.*`` and ``cond_stage_model.*``), ``.wrapped`` segments, and ``denoiser.sigmas``, which the file
    lacks: the components taken from it are the file's, every key and extra as the file has them, nothing more."""
    w = webui("sdxl", no_half=True)
    from dreambooth.models.components import load_components

    keys = w.model.state_dict().keys()
    assert any(k.startswith("cond_stage_model.embedders.1.wrapped.model.") for k in keys) and "denoiser.sigmas" in keys
    host = w.glue.runner().host
    assert host._memory_is_clean(w.model, str(w.base)) == ""
    memory, disk = host._components_from_memory(w.model, str(w.base)), load_components(w.base)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(memory, name).state_dict(), getattr(disk, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert memory.extras.keys() == disk.extras.keys()
    assert all(torch.equal(memory.extras[k], disk.extras[k]) for k in memory.extras)
    assert memory.arch == disk.arch and memory.arch.family == "sdxl"


def test_a_loaded_model_that_lacks_some_of_the_files_tensors_is_not_trained_from(webui):
    """The WebUI loads with ``strict=False``: a tensor of the file that found no place in its model would be missing
    from an output made from memory, so the file is read instead."""
    w = webui("sdxl", no_half=True)
    host = w.glue.runner().host
    owner = w.model.conditioner.embedders._modules["1"].wrapped.model
    del owner._parameters["logit_scale"]
    reason = host._memory_is_clean(w.model, str(w.base))
    assert reason == "the loaded model lacks 1 of the file's tensors (e.g. conditioner.embedders.1.model.logit_scale)"


def test_a_clean_fp32_model_is_trained_from_memory_with_the_same_result(webui, make_settings, tmp_path):
    w = webui(no_half=True)
    runner, settings = settings_for(w, make_settings, model_name="memory")
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS) and runner.snapshot().state == "finished"
    assert any("already loaded in the WebUI" in line for line in runner.snapshot().log)
    from_memory = _final_unet(runner)

    from dreambooth.train.loop import Trainer

    disk = dataclasses.replace(settings, output_dir=str(tmp_path / "disk"), checkpoint_dir="")
    result = Trainer(disk).run()
    from dreambooth.models.files import read_state_dict

    tensors, _ = read_state_dict(result.checkpoints[0])
    base, _ = read_state_dict(w.base)
    # Same start, data and seed: the same training, up to float summation order (copies in memory and tensors read
    # from a file lie at different addresses, which changes the CPU kernels' vector paths; Adam turns such noise on
    # near-zero gradients into full-size steps).  So: the two runs differ far less than either moved from the base.
    keys = list(from_memory)
    apart = torch.cat([(from_memory[k] - tensors[k]).flatten() for k in keys]).norm()
    moved = torch.cat([(tensors[k] - base[k]).flatten() for k in keys]).norm()
    assert moved > 0 and apart < 0.05 * moved, (apart, moved)
    assert w.model.location == "cuda"
    assert all(p.dtype == torch.float32 for p in w.model.parameters())  # the WebUI's own weights were not trained


def test_an_sdxl_model_loaded_in_the_webui_is_trained_from_memory_into_a_listed_checkpoint(webui, make_settings):
    """Issue 15, inside the WebUI: the loaded SDXL model's clean weights are trained (no second read of the file);
    the output lands in the checkpoint folder with its sidecar yaml, is listed, holds exactly the base file's keys,
    and one click makes txt2img use it."""
    w = webui("sdxl", no_half=True)
    from modules import sd_models

    from dreambooth.models.files import read_state_dict, read_yaml

    runner, settings = settings_for(w, make_settings, model_name="xl")
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS) and runner.snapshot().state == "finished", runner.snapshot().error
    assert any("training from the model already loaded in the WebUI" in line for line in runner.snapshot().log)
    output = w.folder / "xl_2.safetensors"
    assert runner.snapshot().checkpoints == (str(output),)
    assert str(output) in [info.filename for info in sd_models.checkpoints_list.values()]
    tensors, base = read_state_dict(output)[0], read_state_dict(w.base)[0]
    assert tensors.keys() == base.keys()  # no cond_stage_model.* copies, no denoiser.sigmas
    assert any(not torch.equal(tensors[k], base[k]) for k in tensors if k.startswith("model.diffusion_model."))
    assert read_yaml(output.with_suffix(".yaml")) == read_yaml(w.base.with_suffix(".yaml"))
    done, message = w.glue.runner().host.use_checkpoint(str(output))
    loaded = sd_models.model_data.sd_model
    assert done and loaded.is_sdxl and loaded.sd_checkpoint_info.filename == str(output), message


@pytest.mark.parametrize(
    ("dirty", "reason"),
    [("lora", "a Lora is patched"), ("half", "loaded weights are torch.float16 while the file holds torch.float32")],
)
def test_weights_that_differ_from_the_file_are_read_from_disk(webui, make_settings, dirty, reason):
    w = webui(no_half=dirty != "half")
    if dirty == "lora":
        import networks

        assert networks.apply_test_deltas(w.model, limit=3)
    runner, settings = settings_for(w, make_settings)
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS) and runner.snapshot().state == "finished"
    log = "\n".join(runner.snapshot().log)
    assert "already loaded" not in log and reason in log


def test_resume_works_under_the_webui_safe_unpickler(webui, make_settings):
    w = webui()
    from modules import safe

    runner, settings = settings_for(w, make_settings, max_train_steps=2)
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS)
    state_dir = Path(settings.output_dir) / "state"
    safe.install()  # the WebUI replaces torch.load for the whole process; a refused file loads as None
    try:
        resumed = dataclasses.replace(settings, max_train_steps=3, resume_from=str(state_dir))
        runner.start(resumed)
        assert runner.wait(WAIT_SECONDS)
    finally:
        safe.uninstall()
    snap = runner.snapshot()
    assert snap.state == "finished", snap.error
    assert any("resumed" in line for line in snap.log) and [s for s, _ in snap.losses] == [3]


class Client:
    """Requests to an ASGI app in-process (starlette's TestClient does not match every httpx version)."""

    def __init__(self, app):
        self.app = app

    def _send(self, method, url, **kwargs):
        import asyncio

        import httpx

        async def go():
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
                return await client.request(method, url, **kwargs)

        return asyncio.run(go())

    def get(self, url, **kwargs):
        return self._send("GET", url, **kwargs)

    def post(self, url, **kwargs):
        return self._send("POST", url, **kwargs)


def _route_paths(app):
    return [getattr(route, "path", "") for route in app.routes if getattr(route, "path", "").startswith("/dreambooth")]


@pytest.mark.parametrize("flags", [{}, {"gradio_auth": "alice:secret"}, {"api_auth": "alice:secret"}])
def test_without_api_there_are_no_rest_routes(webui, flags):
    """Issue 12 item 14: like the WebUI's own API, our routes exist only with --api (else anyone reaching the page
    could start jobs over HTTP; --gradio-auth protects the page, not routes added to its app)."""
    from fastapi import FastAPI

    w = webui(**flags)
    app = FastAPI()
    w.glue.on_app_started(None, app)
    assert _route_paths(app) == []
    assert Client(app).get("/dreambooth/status").status_code == 404
    for api_flags in ({"api": True}, {"nowebui": True}):  # --nowebui serves the API alone
        w = webui(**flags, **api_flags)
        app = FastAPI()
        w.glue.on_app_started(None, app)
        assert "/dreambooth/start" in _route_paths(app)


def test_rest_routes_honour_api_auth(webui, make_settings):
    from fastapi import FastAPI

    webui(api=True, api_auth="alice:secret,bob:pw")
    import dreambooth.webui as glue

    app = FastAPI()
    glue.on_app_started(None, app)
    client = Client(app)
    assert client.get("/dreambooth/status").status_code == 401
    assert client.get("/dreambooth/status", auth=("alice", "wrong")).status_code == 401
    response = client.get("/dreambooth/status", auth=("bob", "pw"))
    assert response.status_code == 200 and response.json()["state"] == "idle"
    bad = client.post("/dreambooth/start", json={"resolution": 65}, auth=("alice", "secret"))
    assert bad.status_code == 422
    assert any("multiple of 8" in p for p in bad.json()["detail"])
    assert client.post("/dreambooth/start", json={"no_such_field": 1}, auth=("alice", "secret")).status_code == 422
    assert client.get("/dreambooth/settings", auth=("alice", "secret")).json() == {"saved": []}


def test_an_api_auth_without_a_user_lets_no_one_in(webui):
    from fastapi import FastAPI

    w = webui(api=True, api_auth="typo-without-colon")
    app = FastAPI()
    w.glue.on_app_started(None, app)
    assert Client(app).get("/dreambooth/status").status_code == 401
    assert Client(app).get("/dreambooth/status", auth=("typo-without-colon", "")).status_code == 401


def test_the_tab_warns_when_other_machines_reach_it_without_a_password(webui):
    """Issue 12 item 14: listening beyond 127.0.0.1 with --api and no --api-auth (or no --gradio-auth) is said at
    the top of the tab."""

    def notes(**flags):
        w = webui(**flags)
        [(blocks, _, _)] = w.glue.on_ui_tabs()
        return " ".join(str(getattr(b, "value", "")) for b in blocks.blocks.values() if b.elem_id == "db_environment")

    open_api = notes(listen=True, api=True, gradio_auth="u:p")
    assert "REST routes have no password" in open_api and "--api-auth" in open_api and "--listen" in open_api
    assert "page has no password" not in open_api
    assert "REST routes have no password" in notes(server_name="0.0.0.0", api=True, gradio_auth="u:p")
    assert "page has no password" in notes(share=True, api=True, api_auth="u:p")
    assert "no password" not in notes(listen=True, api=True, api_auth="u:p", gradio_auth="u:p")
    assert "no password" not in notes(api=True)  # 127.0.0.1 only
    assert "no password" not in notes(server_name="127.0.0.1", api=True)
    assert "REST routes" not in notes(listen=True, gradio_auth="u:p")  # no --api: no routes to warn about


def test_rest_start_refuses_a_class_folder_outside_the_write_roots(webui, make_settings, tmp_path):
    """Issue 12 item 13 through the REST route: readable (DREAMBOOTH_ALLOWED_ROOTS=tmp_path) is not writable."""
    from fastapi import FastAPI

    w = webui(api=True)
    app = FastAPI()
    w.glue.on_app_started(None, app)
    payload = make_settings(
        pretrained_model_name_or_path=str(w.base), with_prior_preservation=True, num_class_images=2
    ).to_dict()
    refused = Client(app).post("/dreambooth/start", json=payload)
    assert refused.status_code == 422
    [problem] = [p for p in refused.json()["detail"] if "class_data_dir" in p]
    assert "may write to" in problem and "DREAMBOOTH_WRITE_ROOTS" in problem and str(w.folder) in problem
    assert not (tmp_path / "class").exists() and w.glue.runner().snapshot().state == "idle"


def test_rest_start_status_and_cancel(webui, make_settings):
    from fastapi import FastAPI

    w = webui(api=True)
    app = FastAPI()
    w.glue.on_app_started(None, app)
    client = Client(app)
    payload = make_settings(pretrained_model_name_or_path=str(w.base), max_train_steps=400).to_dict()
    started = client.post("/dreambooth/start", json=payload)
    assert started.status_code == 200, started.text
    assert started.json()["lora_dir"] == str(w.glue.runner().host.lora_dir)
    runner = w.glue.runner()
    assert wait_for(lambda: runner.snapshot().losses)
    assert client.post("/dreambooth/start", json=payload).status_code == 409  # one job at a time
    assert client.get("/dreambooth/status").json()["is_running"] is True
    assert client.post("/dreambooth/cancel").json() == {"cancelled": True}
    assert runner.wait(WAIT_SECONDS)
    assert client.get("/dreambooth/status").json()["state"] == "cancelled"


def _load_script(extension: Path):
    """Import scripts/dreambooth_tab.py the way the WebUI does (by file path, under a module name of its own)."""
    spec = importlib.util.spec_from_file_location("dreambooth_tab_script", extension / "scripts" / "dreambooth_tab.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def extension_copy(tmp_path):
    """The extension as a ZIP download leaves it: a folder with another name."""
    folder = tmp_path / "sd-webui-dreambooth-main (1)"
    shutil.copytree(ROOT / "dreambooth", folder / "dreambooth", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "scripts", folder / "scripts", ignore=shutil.ignore_patterns("__pycache__"))
    yield folder
    for name in list(sys.modules):
        if name.startswith("sd_webui_dreambooth_trainer"):
            del sys.modules[name]


def test_coexists_with_another_extensions_dreambooth_package(webui, extension_copy, monkeypatch):
    webui()
    theirs = types.ModuleType("dreambooth")
    theirs.__path__ = []  # a package of another extension, loaded first
    theirs.belongs_to = "the other extension"
    monkeypatch.setitem(sys.modules, "dreambooth", theirs)
    _load_script(extension_copy)
    from modules import script_callbacks

    [(blocks, title, _)] = script_callbacks.registered_ui_tabs()[0]()
    assert title == "DreamBooth"
    assert sys.modules["dreambooth"] is theirs  # theirs is untouched
    ours = sys.modules["sd_webui_dreambooth_trainer"]
    assert Path(ours.__file__).parent == extension_copy / "dreambooth"
    assert not any("could not start" in str(getattr(b, "value", "")) for b in blocks.blocks.values())


def test_a_package_that_cannot_load_still_shows_a_tab_that_says_why(webui, extension_copy):
    webui()
    (extension_copy / "dreambooth" / "__init__.py").write_text("import a_missing_dependency_xyz\n")
    _load_script(extension_copy)
    from modules import script_callbacks

    [(blocks, title, _)] = script_callbacks.registered_ui_tabs()[0]()
    texts = " ".join(str(getattr(b, "value", "")) for b in blocks.blocks.values())
    assert title == "DreamBooth" and "a_missing_dependency_xyz" in texts and "could not start" in texts


def test_the_job_thread_never_blocks_the_callers_thread(webui, make_settings):
    """Train returns at once: the UI thread only starts the job (the WebUI's request handler is never held)."""
    w = webui()
    runner, settings = settings_for(w, make_settings, max_train_steps=400)
    started = time.monotonic()
    runner.start(settings)
    assert time.monotonic() - started < 2.0
    assert threading.current_thread() is not runner._thread
    assert wait_for(lambda: runner.snapshot().losses)
    runner.cancel()
    assert runner.wait(WAIT_SECONDS)


def test_the_tabs_webui_captioners_caption_a_folder(webui, tmp_path):
    """The Dataset tools' "BLIP (WebUI)" goes through the WebUI's interrogator, one caption file per image."""
    from conftest import draw_subject

    w = webui()
    draw_subject(tmp_path / "set", count=2)
    host = w.glue.runner().host
    assert "BLIP (WebUI)" in host.captioner_names()
    report = host.caption_folder("BLIP (WebUI)", "", str(tmp_path / "set"), prefix="ohwx ring")
    assert len(report.written) == 2
    assert (tmp_path / "set" / "img_0.txt").read_text().strip().startswith("ohwx ring, ")
    assert "interrogate.generate_caption" in " ".join(w.fake.call_names())


def test_rest_start_remembers_an_empty_class_folder_as_empty(webui, make_settings):
    """As in the tab: the run folder chosen for an empty class folder must not become every later run's."""
    from fastapi import FastAPI

    w = webui(api=True)
    app = FastAPI()
    w.glue.on_app_started(None, app)
    settings = make_settings(
        pretrained_model_name_or_path=str(w.base), with_prior_preservation=True, max_train_steps=1, model_name="ring"
    )
    settings.concepts[0].class_data_dir = ""
    started = Client(app).post("/dreambooth/start", json=settings.to_dict())
    assert started.status_code == 200, started.text
    runner = w.glue.runner()
    assert runner.wait(WAIT_SECONDS) and runner.snapshot().state == "finished", runner.snapshot().error
    assert list((runner.host.run_dir("ring") / "class_images_1").glob("*.png"))
    assert runner.host.last_used().concepts[0].class_data_dir == ""


def test_the_fake_safe_unpickler_accepts_a_release_shaped_ckpt_as_the_real_one_does(webui, tmp_path):
    """AUTOMATIC1111 v1.10.1's check_pt accepts the original SD 1.x .ckpt (lightning callbacks, numpy global_step);
    the fake must too, or tests of that file inside the fake WebUI would prove the wrong thing.  (Legacy format: a zip
    written by today's torch has ``.format_version``, which the real check refuses as well.)"""
    from test_real_checkpoints import write_release_ckpt

    webui()
    from modules import safe

    path = write_release_ckpt(tmp_path / "release.ckpt", {"w": torch.zeros(2)}, zip_format=False)
    safe.check_pt(str(path), None)
    with pytest.raises(Exception, match="forbidden"):
        safe.check_pt(str(_with_forbidden_global(tmp_path / "evil.ckpt")), None)


def _with_forbidden_global(path):
    torch.save({"x": torch.nn.Linear}, path, _use_new_zipfile_serialization=False)
    return path


# ------------------------------------------------------------------------------------------------ LoRA (issue 14)


def _lora_file(path, base="", **metadata):
    """A small kohya-named LoRA file (the tensors do not matter here, the name and metadata do)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {f"{name}.lora_down.weight": torch.zeros(4, 32), f"{name}.lora_up.weight": torch.ones(32, 4)}
    header = {"ss_network_module": "lycoris.kohya", "ss_output_name": path.stem, **metadata}
    if base:
        header["dreambooth.base_model"] = base
    save_file(tensors, str(path), metadata=header)
    return path


def test_a_written_lora_is_listed_at_once_and_gets_its_card(webui, make_settings):
    """Issue 14: after a LoRA file is written, the WebUI's Lora list knows it (the Lora extension's
    ``networks.list_available_networks``) and its card's ``NAME.json`` holds the version and the activation text,
    keeping what the user wrote there."""
    w = webui()
    import networks

    host = w.glue.runner().host
    _, settings = settings_for(w, make_settings, model_name="ring")
    path = _lora_file(host.lora_dir / "ring_2.safetensors", ss_v2="True")
    path.with_suffix(".json").write_text('{"notes": "mine", "sd version": "SD1"}')
    host.checkpoint_written([path], settings)
    assert "networks.list_available_networks" in w.fake.call_names()
    assert networks.available_networks["ring_2"].filename == str(path)
    card = json.loads(path.with_suffix(".json").read_text())
    assert card == {"notes": "mine", "sd version": "SD2", "activation text": "photo of zwx ring"}
    assert not list(w.folder.glob("ring_2*"))  # not a checkpoint


def test_without_the_lora_extension_a_written_lora_is_no_error(webui, make_settings, monkeypatch):
    w = webui()
    host = w.glue.runner().host
    monkeypatch.delitem(sys.modules, "networks", raising=False)  # the Lora extension disabled
    _, settings = settings_for(w, make_settings, model_name="ring")
    path = _lora_file(host.lora_dir / "ring_2.safetensors")
    host.checkpoint_written([path], settings)
    assert json.loads(path.with_suffix(".json").read_text())["sd version"] == "SD1"
    broken = types.ModuleType("networks")
    broken.list_available_networks = lambda: 1 / 0  # another extension's module of that name, or a bug
    monkeypatch.setitem(sys.modules, "networks", broken)
    host.refresh_networks()


def _tab(w):
    from dreambooth.ui.tab import build_tab

    runner = w.glue.runner()
    _, tab = build_tab(runner.host, runner)
    return tab


def test_use_in_txt2img_of_a_lora_switches_to_its_base_model_and_hands_over_its_tag(webui):
    """Issue 14: one click on a LoRA output: the WebUI loads the base model the LoRA was trained on (named in its
    metadata) and the page's script gets ``<lora:NAME:1>`` for the txt2img prompt (the browser test shows the
    prompt)."""
    w = webui()
    from modules import sd_models

    other = w.folder / "other.safetensors"
    shutil.copy(w.base, other)
    shutil.copy(w.base.with_suffix(".yaml"), other.with_suffix(".yaml"))
    tab = _tab(w)
    w.glue.runner().host.use_checkpoint(str(other))
    assert sd_models.model_data.sd_model.sd_checkpoint_info.filename == str(other)
    lora = _lora_file(tab.host.lora_dir / "ring_2.safetensors", base=str(w.base))
    c = tab.controls
    out = tab.use_checkpoint(str(lora))
    assert sd_models.model_data.sd_model.sd_checkpoint_info.filename == str(w.base), out[c["message"]]
    assert out[c["lora_tag"]] == "<lora:ring_2:1>" and out[c["switched"]].startswith("base.safetensors")
    assert "<lora:ring_2:1>" in out[c["message"]]
    again = tab.use_checkpoint(str(lora))  # already loaded: no second load, the tag again
    assert again[c["lora_tag"]] == "<lora:ring_2:1>" and "already" in again[c["message"]]

    w.glue.runner().host.use_checkpoint(str(other))
    moved = _lora_file(tab.host.lora_dir / "made_elsewhere.safetensors", base="/another/machine/base.safetensors")
    out = tab.use_checkpoint(str(moved))  # its base named by a path that is not here: found by its file name
    assert out[c["lora_tag"]] == "<lora:made_elsewhere:1>", out[c["message"]]
    assert sd_models.model_data.sd_model.sd_checkpoint_info.filename == str(w.base)

    unknown = _lora_file(tab.host.lora_dir / "nobase.safetensors")
    out = tab.use_checkpoint(str(unknown))
    assert out[c["lora_tag"]] == "" and "which base model" in out[c["message"]]
    bad = _lora_file(tab.host.lora_dir / "a=b.safetensors", base=str(w.base))
    out = tab.use_checkpoint(str(bad))
    assert out[c["lora_tag"]] == "" and "cannot hold '='" in out[c["message"]]
    out = tab.use_checkpoint(str(w.base))  # a checkpoint: as before, no tag
    assert out[c["lora_tag"]] == "" and "now uses" in out[c["message"]]


def test_a_loaded_lora_network_makes_the_loaded_weights_unclean(webui):
    """Facts §1.6: while the Lora extension holds loaded networks, its class-level forwards patch the loaded
    model's layers again: the weights are read from the file."""
    w = webui(no_half=True)
    import networks

    host = w.glue.runner().host
    assert host._memory_is_clean(w.model, str(w.base)) == ""
    networks.loaded_networks.append(types.SimpleNamespace(name="other_lora"))
    assert "a Lora network is loaded in the WebUI (other_lora" in host._memory_is_clean(w.model, str(w.base))


def test_a_lora_run_takes_the_loaded_half_weights_as_they_are(webui):
    """Issue 14: with an adapter the base stays frozen, so the WebUI's fp16 weights are clean for it and are taken
    without a copy (the same storage, no fp32 copy); a full fine-tune still refuses them."""
    w = webui()  # the WebUI casts to fp16
    host = w.glue.runner().host
    assert "torch.float16 while the file holds torch.float32" in host._memory_is_clean(w.model, str(w.base))
    assert host._memory_is_clean(w.model, str(w.base), frozen=True) == ""
    components = host._components_from_memory(w.model, str(w.base), shared=True)
    loaded = {t.data_ptr() for t in w.model.state_dict().values()}
    unet = list(components.unet.parameters())
    assert all(p.dtype == torch.float16 for p in unet)
    assert all(p.data_ptr() in loaded for p in unet)  # the WebUI's tensors themselves
    assert not any(p.requires_grad for p in unet)


def _unet_output(w):
    """The UNet of the WebUI's loaded model (an fp32 copy of its weights) on a fixed input."""
    host = w.glue.runner().host
    unet = host._components_from_memory(w.model, str(w.base)).unet
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample


@pytest.mark.parametrize("no_half", [True, False])
def test_a_lora_run_on_the_loaded_model_leaves_its_weights_and_forward_as_they_were(webui, make_settings, no_half):
    """Issue 14: a LoRA run trains on the WebUI's loaded tensors themselves (no copy); the adapter wraps forwards
    at instance level and is taken off at the end: afterwards the loaded model's weights are the same tensors with
    the same values, no module keeps a forward of its own, and its UNet computes exactly what it did."""
    w = webui(no_half=no_half)
    before = {k: (t.data_ptr(), t.clone()) for k, t in w.model.state_dict().items()}
    output = _unet_output(w)
    linear_forward, conv_forward = torch.nn.Linear.forward, torch.nn.Conv2d.forward
    runner, settings = settings_for(w, make_settings, model_name="ringlora", training_method="lora")
    runner.start(settings)
    assert runner.wait(WAIT_SECONDS) and runner.snapshot().state == "finished", runner.snapshot().error
    log = "\n".join(runner.snapshot().log)
    dtype = "float32" if no_half else "float16"
    assert f"training the lora on the weights already loaded in the WebUI ({dtype}, shared" in log
    assert runner.snapshot().checkpoints == (str(runner.host.lora_dir / "ringlora_2.safetensors"),)
    after = w.model.state_dict()
    assert after.keys() == before.keys()
    for key, (pointer, value) in before.items():
        assert after[key].data_ptr() == pointer and torch.equal(after[key], value), key
    assert not [name for name, module in w.model.named_modules() if "forward" in vars(module)]
    assert (torch.nn.Linear.forward, torch.nn.Conv2d.forward) == (linear_forward, conv_forward)
    assert torch.equal(_unet_output(w), output)
    assert w.model.location == "cuda"
