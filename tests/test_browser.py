"""The tab in a real browser: headless Chromium (Debian's package) driven by Playwright, against the standalone app.

One story, as a user lives it: open the page, fill a concept, start a short training, watch the progress advance and a
sample appear, reload the page mid-run and find the job again, let it finish, find the checkpoint in the models folder.
In CI (``CI=true``) a missing Chromium or Playwright fails the test; elsewhere it skips.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
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


@pytest.fixture
def app(tmp_path, tiny_checkpoint):
    """The standalone app on 127.0.0.1 with the tiny model in its models folder."""
    models = tmp_path / "models"
    checkpoints = models / "Stable-diffusion"
    checkpoints.mkdir(parents=True)
    source = tiny_checkpoint("sd1")
    shutil.copy(source, checkpoints / source.name)
    shutil.copy(source.with_suffix(".yaml"), checkpoints / f"{source.stem}.yaml")
    draw_subject(tmp_path / "ring", count=3)
    port = _free_port()
    log = (tmp_path / "server.log").open("w")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "dreambooth", "ui", "--models-dir", str(models), "--port", str(port)]
    server = subprocess.Popen([*command, "--allow", str(tmp_path)], cwd=ROOT, stdout=log, stderr=log, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the app exited: {(tmp_path / 'server.log').read_text()}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        server.kill()
        pytest.fail("the app did not start in time")
    try:
        yield {"url": url, "models": models, "data": tmp_path / "ring", "log": tmp_path / "server.log"}
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


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


def test_train_from_the_browser(app):
    _need(Path(CHROMIUM).exists(), "Chromium (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api") if os.environ.get("CI") != "true" else None
    if sync_api is None:
        from playwright import sync_api

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.set_default_timeout(30_000)
        page.goto(app["url"])
        _tab(page, "Model").click()
        page.locator("#db_settings_message").first.get_by_text("Default settings").wait_for()  # the form is filled
        model = page.locator("#db_pretrained_model_name_or_path input")
        assert model.input_value().endswith("tiny-sd1.safetensors")  # the first checkpoint is preselected
        page.locator("#db_model_name textarea").fill("ring")

        _tab(page, "Concepts").click()
        page.locator("#db_concept_instance_data_dir textarea").fill(str(app["data"]))
        page.locator("#db_concept_instance_prompt textarea").fill("photo of sks ring")
        preview = page.locator("#db_token_preview").first
        preview.get_by_text("already means something").wait_for()  # the identifier advisor warns about sks

        _tab(page, "Dataset").click()
        page.locator("#db_resolution input").fill("64")
        page.locator("#db_check_dataset").click()
        page.locator("#db_dataset_report").first.get_by_text("3 image(s)").wait_for()

        _tab(page, "Parameters").click()
        page.locator("#db_group_basics").get_by_text("max_train_steps").first.wait_for()
        page.locator("#db_max_train_steps input").fill("240")
        page.locator("#db_group_saving").click()
        page.locator("#db_save_model_every_n_steps input").fill("60")
        page.locator("#db_group_samples").click()
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
        assert page.locator("#db_model_name textarea").input_value() == "ring"  # the form came back too

        _wait_text(page, r"Finished: ring", RUN_SECONDS)
        browser.close()
    assert (app["models"] / "Stable-diffusion" / "ring_240.safetensors").is_file()
    assert (app["models"] / "Stable-diffusion" / "ring_60.safetensors").is_file()
