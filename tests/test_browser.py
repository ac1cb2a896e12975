"""The tab in a real browser: headless Chromium (Debian's package) driven by Playwright, against the standalone app
and against the fake WebUI's page (tests/fake_webui/webui.py).

Standalone, one story as a user lives it: open the page, fill a concept, start a short training, watch the progress
advance and a sample appear, reload the page mid-run and find the job again, let it finish, find the checkpoint in the
models folder.  In the fake WebUI: train, "Use in txt2img", and the WebUI's own checkpoint dropdown shows the new model.
In CI (``CI=true``) a missing Chromium or Playwright fails the test; elsewhere it skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import draw_subject

pytestmark = [pytest.mark.browser, pytest.mark.gradio]

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
START_SECONDS = 120
RUN_SECONDS = 300
SCREENSHOT = ROOT / "docs" / "tab.png"


def _need(condition: bool, what: str) -> None:
    if condition:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} is missing; CI must install it (see bootstrap.py)")
    pytest.skip(f"{what} is missing")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _serve(command: list[str], port: int, log_path: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Run a server command until its port answers; yields its URL and stops it afterwards."""
    log = log_path.open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    server = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + START_SECONDS
    try:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                pytest.fail(f"the server exited: {log_path.read_text()}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        else:
            pytest.fail(f"the server did not start in time: {log_path.read_text()}")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


@contextlib.contextmanager
def _standalone(tmp_path: Path, source: Path) -> Iterator[dict]:
    """The standalone app on 127.0.0.1 with the tiny model ``source`` in its models folder."""
    models = tmp_path / "models"
    checkpoints = models / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    shutil.copy(source, checkpoints / source.name)
    shutil.copy(source.with_suffix(".yaml"), checkpoints / f"{source.stem}.yaml")
    draw_subject(tmp_path / "ring", count=3)
    port = _free_port()
    command = [sys.executable, "-m", "dreambooth", "ui", "--models-dir", str(models), "--port", str(port)]
    with _serve([*command, "--allow", str(tmp_path)], port, tmp_path / "server.log") as url:
        yield {"url": url, "models": models, "data": tmp_path / "ring", "log": tmp_path / "server.log"}


@pytest.fixture
def app(tmp_path, tiny_checkpoint):
    with _standalone(tmp_path, tiny_checkpoint("sd1")) as served:
        yield served


@pytest.fixture
def sd_shaped_app(tmp_path, tiny_checkpoint):
    """The app with a tiny model of the real SD UNet's shape (which LoRA names follow)."""
    with _standalone(tmp_path, tiny_checkpoint("sd1-sd")) as served:
        yield served


@pytest.fixture
def fake_webui(tmp_path, tiny_checkpoint):
    """The fake WebUI's page with the extension's tab, the tiny model loaded."""
    draw_subject(tmp_path / "ring", count=2)
    port = _free_port()
    env = {"DREAMBOOTH_ALLOWED_ROOTS": str(tmp_path), "DREAMBOOTH_DATA_DIR": str(tmp_path / "extension-data")}
    command = [sys.executable, str(ROOT / "tests" / "fake_webui" / "webui.py"), str(tmp_path / "webui"), str(port)]
    source = tiny_checkpoint("sd1")
    other = tmp_path / "other.safetensors"  # a second model the user may have loaded (issue 14: the switch back)
    shutil.copy(source, other)
    shutil.copy(source.with_suffix(".yaml"), other.with_suffix(".yaml"))
    with _serve([*command, str(source), str(other)], port, tmp_path / "webui.log", env) as url:
        yield {"url": url, "data": tmp_path / "ring", "log": tmp_path / "webui.log", "root": tmp_path / "webui"}


def _browser():
    _need(Path(CHROMIUM).exists(), "Chromium (apt-get install chromium)")
    if os.environ.get("CI") == "true":
        from playwright import sync_api
    else:
        sync_api = pytest.importorskip("playwright.sync_api")
    return sync_api


def _screenshot(page, path: Path) -> None:
    """A small PNG of the Run panel; with ``DREAMBOOTH_UPDATE_SCREENSHOT=1`` it replaces the README's picture."""
    from PIL import Image

    page.screenshot(path=str(path))
    with Image.open(path) as image:
        small = image.convert("RGB").resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
        small.quantize(colors=64).save(path, optimize=True)
    assert path.stat().st_size < 150_000
    if os.environ.get("DREAMBOOTH_UPDATE_SCREENSHOT") == "1":
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copy(path, SCREENSHOT)


def _tab(page, name: str):
    return page.locator(".tab-nav button", has_text=re.compile(rf"^\s*{name}\s*$"))


def _status(page) -> str:
    return page.locator("#db_status").first.inner_text()


def _wait_text(page, pattern: str, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    text = ""
    while time.monotonic() < deadline:
        text = _status(page)
        if re.search(pattern, text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"status never matched {pattern!r}; last: {text!r}")


def _step(text: str) -> int:
    found = re.search(r"step (\d+) / (\d+)", text)
    return int(found.group(1)) if found else -1


def _fill_a_short_run(page, data: Path, steps: int, resolution: int = 64) -> None:
    """On the Setup panel's first screen: a concept and a short run."""
    page.locator("#db_concept_instance_data_dir input").fill(str(data))
    page.locator("#db_concept_instance_prompt input").fill("photo of sks ring")
    page.locator("#db_resolution input").fill(str(resolution))
    page.locator("#db_max_train_steps input").fill(str(steps))


def test_train_from_the_browser(app):
    sync_api = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(app["url"])
        _tab(page, "Setup").click()
        page.locator("#db_settings_message").first.get_by_text("Default settings").wait_for()  # the form is filled
        model = page.locator("#db_pretrained_model_name_or_path input")
        assert model.input_value() == "tiny-sd1.safetensors"  # preselected, shown by its title, not its path
        page.locator("#db_architecture").first.get_by_text("SD 1.x").wait_for()  # described without a change
        page.locator("#db_model_name input").fill("ring")

        _fill_a_short_run(page, app["data"], steps=240)
        preview = page.locator("#db_token_preview").first
        preview.get_by_text("already means something").wait_for()  # the identifier advisor warns about sks
        warned = [line for line in preview.inner_text().splitlines() if "warning" in line]
        assert warned and all("sks" in line for line in warned), warned  # and about nothing else
        page.locator("#db_check_dataset").click()
        page.locator("#db_dataset_report").first.get_by_text("3 image(s)").wait_for()
        page.locator("#db_save_model_every_n_steps input").fill("60")
        page.locator("#db_group_samples").click()  # the rest is folded away, one click off
        page.locator("#db_save_infer_steps input").fill("2")

        _tab(page, "Run").click()
        page.locator("#db_train").click()
        page.locator("#db_message").first.get_by_text("Started").wait_for()
        first = _step(_wait_text(page, r"step \d+ / 240", RUN_SECONDS))
        later = _step(_wait_text(page, r"step (?!0 )\d+ / 240", RUN_SECONDS))
        deadline = time.monotonic() + RUN_SECONDS
        while _step(_status(page)) <= first and time.monotonic() < deadline:
            time.sleep(0.25)
        assert _step(_status(page)) > first or later > first, "the progress did not advance"
        page.locator("#db_samples img").first.wait_for(timeout=RUN_SECONDS * 1000)
        _screenshot(page, app["log"].parent / "tab.png")

        # a reload mid-run re-attaches to the job
        before = _step(_status(page))
        page.reload()
        page.locator("#db_settings_message").first.get_by_text("last training are back").wait_for()
        _tab(page, "Run").click()
        text = _wait_text(page, r"Training: ring|Finished: ring", RUN_SECONDS)
        assert "Finished" in text or _step(text) >= before
        assert page.locator("#db_model_name input").input_value() == "ring"  # the form came back too

        _wait_text(page, r"Finished: ring", RUN_SECONDS)
        browser.close()
    assert (app["models"] / "Stable-diffusion" / "ring_240.safetensors").is_file()
    assert (app["models"] / "Stable-diffusion" / "ring_60.safetensors").is_file()


def test_use_in_txt2img_updates_the_webuis_checkpoint_dropdown(fake_webui):
    """Item 24: after the switch the WebUI's own checkpoint dropdown (top left) kept showing the old model."""
    sync_api = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(fake_webui["url"])
        top = page.locator("#setting_sd_model_checkpoint input")
        assert top.input_value().startswith("tiny-sd1.safetensors")
        _tab(page, "DreamBooth").click()
        page.locator("#db_settings_message").first.get_by_text("Default settings").wait_for()
        page.locator("#db_model_name input").fill("ring")
        _fill_a_short_run(page, fake_webui["data"], steps=2)
        page.locator("#db_n_save_sample input").fill("0")

        _tab(page, "Run").click()
        page.locator("#db_train").click()
        page.locator("#db_message").first.get_by_text("Started").wait_for()
        _wait_text(page, r"Finished: ring", RUN_SECONDS)
        checkpoint = page.locator("#db_checkpoints input")
        deadline = time.monotonic() + START_SECONDS
        while "ring_2.safetensors" not in checkpoint.input_value() and time.monotonic() < deadline:
            time.sleep(0.25)
        page.locator("#db_use_checkpoint").click()
        page.locator("#db_message").first.get_by_text("txt2img now uses").wait_for()
        deadline = time.monotonic() + START_SECONDS
        while not top.input_value().startswith("ring_2.safetensors") and time.monotonic() < deadline:
            time.sleep(0.25)
        shown = top.input_value()
        browser.close()
    assert shown.startswith("ring_2.safetensors"), f"the WebUI's dropdown shows {shown!r}"


def _wait_value(locator, wanted, seconds: float = START_SECONDS) -> str:
    """The input's value once ``wanted(value)`` holds (bounded)."""
    deadline = time.monotonic() + seconds
    value = locator.input_value()
    while not wanted(value) and time.monotonic() < deadline:
        time.sleep(0.25)
        value = locator.input_value()
    return value


def _choose(page, field: str, value: str, group: str = "") -> None:
    """Pick ``value`` in the dropdown of settings field ``field`` (first unfolding its ``group`` if it is folded)."""
    if group and not page.locator(f"#db_{field} input").is_visible():
        page.locator(f"#db_group_{group}").click()
    option = page.locator(f'ul.options li[data-value="{value}"]').first
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:  # the choices may still be on their way (a Refresh)
        page.locator(f"#db_{field} input").click()
        try:
            option.wait_for(timeout=2_000)
            break
        except Exception:
            page.keyboard.press("Escape")
    option.click()


@pytest.mark.slow
def test_use_in_txt2img_of_a_lora_switches_the_model_and_adds_the_tag_to_the_users_prompt(fake_webui):
    """Issue 14: train a LoRA in the tab; "Use in txt2img" loads the base model it was trained on (the user had
    switched to another) and appends ``<lora:NAME:1>`` to what the user typed in the txt2img prompt, once; the
    WebUI's txt2img receives that prompt with that model."""
    sync_api = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(fake_webui["url"])
        prompt = page.locator("#txt2img_prompt textarea")
        prompt.fill("a photo of a ring, best quality")
        _tab(page, "DreamBooth").click()
        page.locator("#db_settings_message").first.get_by_text("Default settings").wait_for()
        page.locator("#db_model_name input").fill("ringlora")
        _choose(page, "training_method", "lora", group="network")
        _fill_a_short_run(page, fake_webui["data"], steps=2)
        page.locator("#db_n_save_sample input").fill("0")
        _tab(page, "Run").click()
        page.locator("#db_train").click()
        page.locator("#db_message").first.get_by_text("Started").wait_for()
        _wait_text(page, r"Finished: ringlora", RUN_SECONDS)
        assert "ringlora_2.safetensors" in _wait_value(
            page.locator("#db_checkpoints input"), lambda v: "ringlora_2.safetensors" in v
        )

        top = page.locator("#setting_sd_model_checkpoint input")  # the user switches to another model
        top.click()
        page.locator("ul.options li", has_text="other.safetensors").first.click()
        assert _wait_value(top, lambda v: v.startswith("other.safetensors")).startswith("other.safetensors")

        for _ in range(2):  # the second click adds nothing
            page.locator("#db_use_checkpoint").click()
            page.locator("#db_message").first.get_by_text("<lora:ringlora_2:1>").wait_for()
        shown = _wait_value(top, lambda v: v.startswith("tiny-sd1.safetensors"))
        _tab(page, "txt2img").click()
        typed = _wait_value(prompt, lambda v: "<lora:" in v)
        page.locator("#txt2img_generate").click()
        generated = page.locator("#txt2img_generated textarea")
        asked = _wait_value(generated, bool)
        browser.close()
    assert shown.startswith("tiny-sd1.safetensors"), f"the WebUI's dropdown shows {shown!r}"
    assert typed == "a photo of a ring, best quality <lora:ringlora_2:1>"
    assert asked.startswith("tiny-sd1.safetensors") and asked.endswith(": " + typed)  # what txt2img was given
    lora_dir = fake_webui["root"] / "models" / "Lora"
    assert (lora_dir / "ringlora_2.safetensors").is_file()
    card = json.loads((lora_dir / "ringlora_2.json").read_text())
    assert card == {"sd version": "SD1", "activation text": "photo of sks ring"}


@pytest.mark.slow
def test_train_a_lora_from_the_browser(sd_shaped_app):
    """Issue 14: choose the LoRA method in the tab of the standalone app, train 2 steps on a tiny SD-shaped model:
    the file appears in the app's Lora folder and in the tab's outputs, with no full checkpoint beside it."""
    sync_api = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        app = sd_shaped_app
        page.goto(app["url"])
        _tab(page, "Setup").click()
        page.locator("#db_settings_message").first.get_by_text("Default settings").wait_for()
        assert page.locator("#db_pretrained_model_name_or_path input").input_value() == "tiny-sd1-sd.safetensors"
        page.locator("#db_model_name input").fill("ringlora")
        _choose(page, "training_method", "lora", group="network")
        _fill_a_short_run(page, app["data"], steps=2)
        page.locator("#db_group_samples").click()
        page.locator("#db_n_save_sample input").fill("0")
        _tab(page, "Run").click()
        page.locator("#db_train").click()
        page.locator("#db_message").first.get_by_text("Started").wait_for()
        _wait_text(page, r"Finished: ringlora", RUN_SECONDS)
        listed = _wait_value(page.locator("#db_checkpoints input"), lambda v: "ringlora_2.safetensors" in v)
        browser.close()
    lora = app["models"] / "Lora" / "ringlora_2.safetensors"
    assert "ringlora_2.safetensors" in listed and lora.is_file()
    assert not list((app["models"] / "Stable-diffusion").glob("ringlora*"))
    from dreambooth.network.files import read_network_file

    network = read_network_file(lora)
    assert network.algorithm == "lora"
    assert any(name.startswith("lora_unet_down_blocks_0_attentions_0") for name in network.layers)


def _estimate_mib(page, other_than: int | None = None) -> int:
    """The memory estimate beside Train, in MiB; with ``other_than``: once it shows another figure."""
    panel = page.locator("#db_memory_estimate").first
    deadline = time.monotonic() + START_SECONDS
    text = ""
    while time.monotonic() < deadline:
        text = panel.inner_text()
        found = re.search(r"Estimated peak GPU memory: [\d.]+ GiB \(([\d,]+) MiB", text)
        if found and int(found.group(1).replace(",", "")) != other_than:
            return int(found.group(1).replace(",", ""))
        time.sleep(0.25)
    raise AssertionError(f"the estimate never showed a figure other than {other_than}; last: {text!r}")


def test_the_memory_estimate_follows_resolution_and_checkpointing(app):
    """Issue 13: the estimate beside Train changes when the resolution or gradient checkpointing does."""
    sync_api = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(app["url"])
        page.locator("#db_settings_message").first.get_by_text("Default settings").wait_for()
        _tab(page, "Run").click()
        at_512 = _estimate_mib(page)  # shown once the page is filled, without any change

        _tab(page, "Setup").click()
        page.locator("#db_resolution input").fill("256")
        _tab(page, "Run").click()
        at_256 = _estimate_mib(page, other_than=at_512)
        assert at_256 < at_512

        _tab(page, "Setup").click()
        page.locator("#db_group_memory").click()
        page.locator("#db_gradient_checkpointing input").check()
        _tab(page, "Run").click()
        checkpointed = _estimate_mib(page, other_than=at_256)
        browser.close()
    assert checkpointed < at_256


def test_the_validation_loss_curve_is_drawn_beside_the_training_loss(app, tmp_path):
    """Issue 16: a run with a held-out image (validation_split) and validation every step draws a second line,
    "validation", in the tab's loss plot, and the status shows the latest validation loss."""
    sync_api = _browser()
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(60_000)
        page.goto(app["url"])
        _tab(page, "Setup").click()
        page.locator("#db_settings_message").first.get_by_text("Default settings").wait_for()
        page.locator("#db_model_name input").fill("ringval")
        _fill_a_short_run(page, app["data"], steps=3)
        page.locator("#db_group_saving").click()
        page.locator("#db_validation_split input").fill("0.34")
        page.locator("#db_validation_steps input").fill("1")
        page.locator("#db_group_samples").click()
        page.locator("#db_n_save_sample input").fill("0")
        _tab(page, "Run").click()
        page.locator("#db_train").click()
        page.locator("#db_message").first.get_by_text("Started").wait_for()
        status = _wait_text(page, r"Finished: ringval", RUN_SECONDS)
        plot = page.locator("#db_loss_plot")
        deadline = time.monotonic() + START_SECONDS
        colours = (0, 0)
        while time.monotonic() < deadline and min(colours) < 50:  # vega draws on a canvas: count the two lines' hues
            colours = _line_colours(plot.screenshot())
            time.sleep(0.5)
        _screenshot(page, tmp_path / "validation-plot.png")
        browser.close()
    assert min(colours) >= 50, f"the plot shows one series only (red, green pixels: {colours})"
    assert re.search(r"validation loss \d", status), status


def _line_colours(png: bytes) -> tuple[int, int]:
    """Pixels of the loss plot's two series colours in a screenshot: (red: training, green: validation)."""
    import io

    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    red = int(((r > g + 60) & (r > b + 40)).sum())
    green = int(((g > r + 40) & (g > b + 20)).sum())
    return red, green
