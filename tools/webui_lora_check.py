"""Check our LoRA files in a real AUTOMATIC1111 WebUI (v1.10.1): its own Lora loader maps every key, the tag changes
the image, its extra-networks card shows our metadata.  Nothing here downloads anything; the WebUI must be installed.

    .venv-webui/bin/python tools/webui_lora_check.py --webui /path/to/stable-diffusion-webui \\
        --webui-python /path/to/its/venv/bin/python --work /tmp/lora-check [--lora FILE] [--family sd1|sd2-v|sdxl]

What it does, in order (each step prints one line; the summary goes to WORK/summary.json):

1. Writes a tiny checkpoint with the real SD UNet's shape (``write_tiny_checkpoint(layout="sd")``: the WebUI maps
   LoRA names through the real UNet's layout) into WORK, and copies it with its yaml into the WebUI's
   ``models/Stable-diffusion`` (the yaml names the tiny CLIP folder in WORK; it must not sit in the models folder).
   SDXL (``--family sdxl``, or an SDXL ``--base``): the tiny SDXL; its yaml names a tiny open_clip config for the
   second text encoder, which open_clip only finds in its registry, so this check copies ``<name>.json`` (beside the
   CLIP folder) into the WebUI venv's ``open_clip/model_configs/`` -- test set-up, never done by the extension.
2. The LoRA: ``--lora FILE`` (a file our trainer wrote for that checkpoint, ``--base``), else one built here: lycoris
   LoRA modules on the layers :func:`dreambooth.network.names.select_targets` picks (conv layers included), with
   random non-zero up weights, written by :func:`dreambooth.network.files.write_network_file` with kohya metadata.
   It goes into the WebUI's ``models/Lora``.  SDXL needs ``--lora`` (a file our trainer wrote for ``--base``).
3. Starts the WebUI on 127.0.0.1 (CPU, ``--api --loglevel DEBUG``, the tiny checkpoint), waits for "Startup time:".
4. ``GET /sdapi/v1/loras``: our file is listed with our metadata.  txt2img (live preview "Approx cheap": the
   default "Approx NN" downloads ``vaeapprox-sdxl.pt`` for SDXL), same seed, with ``<lora:NAME:1>``,
   ``<lora:NAME:0>`` and without a tag: the first differs from the other two.  The WebUI's log has no "didn't match",
   "could not find", "Couldn't find" or "Networks with errors" line, and the infotext no "Lora not found".
5. Optionally (``--screenshot OUT.png``, Playwright + /usr/bin/chromium) a picture of the txt2img Lora tab with the
   card, and the card's HTML from ``/sd_extra_networks/get-single-card``.
6. Stops the WebUI (its process group).

A tiny random CLIP's embeddings average about 0, and the WebUI's default emphasis ("Original") divides by that
average: a strongly trained text-encoder adapter can then make txt2img fail with "A tensor with NaNs was produced in
Unet" (seen with 20 steps at learning rate 3e-2; the same file works with ``--emphasis "No norm"``, and its UNet
layers alone work either way).  Real CLIP embeddings do not average 0.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

START_SECONDS = 900
REQUEST_SECONDS = 600
BAD_LINES = ("didn't match", "could not find", "couldn't find", "networks with errors", "lora not found")
PROMPT = "photo of zwx ring"


def say(text: str) -> None:
    print(text, flush=True)


# ------------------------------------------------------------------------------------------------ files


def write_base(work: Path, family: str, models: Path) -> Path:
    """The tiny SD-shaped checkpoint, written into WORK and copied (with its yaml) into the WebUI's models."""
    from dreambooth.models.tiny import write_tiny_checkpoint

    kind, _, prediction = family.partition("-")
    sdxl = kind == "sdxl"  # the tiny SDXL has the real SDXL UNet's shape already (one layout)
    path = write_tiny_checkpoint(
        work,
        family=kind,
        prediction_type={"v": "v_prediction", "eps": "epsilon"}.get(prediction),
        name=f"tiny-{family}" if sdxl else f"tiny-{family}-sd",
        layout="small" if sdxl else "sd",
    )
    target = models / "Stable-diffusion" / path.name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(path, target)
    shutil.copy(path.with_suffix(".yaml"), target.with_suffix(".yaml"))
    return target


def register_open_clip_config(base: Path, python: str) -> str:
    """For an SDXL base whose yaml names an open_clip config other than ViT-bigG-14: copy that config (written
    beside the tiny CLIP folder by ``write_tiny_checkpoint``) into the WebUI venv's open_clip registry.  Returns
    what was done, '' when nothing was needed."""
    from dreambooth.models.files import read_yaml

    yaml_path = base.with_suffix(".yaml")
    models = read_yaml(yaml_path)["model"]["params"].get("conditioner_config", {}).get("params", {}).get("emb_models")
    embedders = [m for m in models or [] if str(m.get("target", "")).endswith("FrozenOpenCLIPEmbedder2")]
    if not embedders:
        return ""
    name = embedders[0]["params"]["arch"]
    folder = subprocess.run(
        [python, "-c", "import open_clip, pathlib; print(pathlib.Path(open_clip.__file__).parent / 'model_configs')"],
        capture_output=True, text=True, check=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    target = Path(folder) / f"{name}.json"
    if target.is_file():
        return f"open_clip config {name} already registered ({target})"
    clip_folder = models[0].get("params", {}).get("version") if models else None
    source = Path(clip_folder or "") / f"{name}.json"
    if not source.is_file():
        raise SystemExit(f"{yaml_path} names open_clip config {name}, which is neither in {folder} nor at {source}")
    shutil.copy(source, target)
    return f"registered open_clip config {name}: {source} -> {target} (test set-up)"


def build_lora(base: Path, out: Path, family: str, rank: int = 4, seed: int = 0) -> Path:
    """A LoRA for ``base`` made of lycoris LoRA modules on our chosen layers, up weights random (non-zero)."""
    import torch
    from lycoris.modules.locon import LoConModule

    from dreambooth.models.components import load_components
    from dreambooth.network.files import write_network_file
    from dreambooth.network.metadata import version_metadata
    from dreambooth.network.names import select_targets

    torch.manual_seed(seed)
    components = load_components(base)
    tensors: dict[str, torch.Tensor] = {}
    targets = select_targets(
        components.unet, components.text_encoder, conv=True, text_encoder_2=components.text_encoder_2
    )
    for target in targets:
        module = LoConModule(target.name, target.module, lora_dim=rank, alpha=rank / 2)
        with torch.no_grad():
            module.lora_up.weight.normal_(0, 0.5)
        for key, value in module.state_dict().items():
            tensors[f"{target.name}.{key}"] = value.float()
    metadata = {
        "ss_output_name": out.stem,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": str(rank / 2),
        "ss_sd_model_name": base.name,
        **version_metadata(components.arch),
        "ss_resolution": "(64, 64)",
        "ss_training_started_at": str(time.time()),
        "ss_tag_frequency": json.dumps({"ring": {"zwx ring": 3}}),
        "dreambooth.base_model": str(base),
    }
    write_network_file(out, tensors, metadata)
    say(f"built {out} ({len(targets)} layers, rank {rank}) with lycoris LoConModule")
    return out


# ------------------------------------------------------------------------------------------------ the WebUI


def start_webui(webui: Path, python: str, checkpoint: Path, port: int, log_path: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "DO_NOT_TRACK": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    command = [
        python, "-u", "launch.py", "--skip-torch-cuda-test", "--no-half", "--no-half-vae", "--precision", "full",
        "--use-cpu", "all", "--skip-prepare-environment", "--skip-install", "--skip-version-check",
        "--no-download-sd-model", "--port", str(port), "--api", "--loglevel", "DEBUG", "--ckpt", str(checkpoint),
    ]  # fmt: skip
    log = log_path.open("w")
    process = subprocess.Popen(
        command, cwd=webui, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if "Startup time:" in log_path.read_text(errors="replace"):
            return process
        if process.poll() is not None:
            raise SystemExit(f"the WebUI exited while starting; see {log_path}")
        time.sleep(1)
    stop_webui(process)
    raise SystemExit(f"no 'Startup time:' after {START_SECONDS} s; see {log_path}")


def stop_webui(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)


def call(url: str, payload: dict | None = None, method: str | None = None) -> object:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data else "GET"))
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=REQUEST_SECONDS) as response:
        body = response.read()
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


def txt2img(url: str, prompt: str, emphasis: str = "") -> tuple[object, str]:
    """One 64x64 image (as a numpy array) and its infotext, with a fixed seed."""
    import numpy as np
    from PIL import Image

    payload = {"prompt": prompt, "steps": 4, "width": 64, "height": 64, "seed": 1234, "sampler_name": "Euler",
               "cfg_scale": 7, "batch_size": 1}  # fmt: skip
    # "Approx NN" (the default live preview) downloads vaeapprox-sdxl.pt at the first SDXL image: offline it fails
    payload["override_settings"] = {"show_progress_type": "Approx cheap"}
    if emphasis:
        payload["override_settings"]["emphasis"] = emphasis
    answer = call(f"{url}/sdapi/v1/txt2img", payload)
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB")
    return np.asarray(image).astype("int16"), json.loads(answer["info"]).get("infotexts", [""])[0]


def screenshot(url: str, name: str, out: Path) -> str:
    """The txt2img page's Lora tab with our card (``out``), then the card's metadata dialog (``OUT-metadata.png``);
    returns the dialog's text."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--headless", "--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.locator("#txt2img_extra_tabs button", has_text="Lora").first.click()
        card = page.locator(f'#txt2img_lora_cards .card[data-name="{name}"]').first
        card.wait_for()
        card.scroll_into_view_if_needed()
        page.screenshot(path=str(out))
        card.hover()
        card.locator(".edit-button").click()  # the card's "edit metadata" button: the user-metadata dialog
        dialog = page.locator("#txt2img_lora_edit_user_metadata")
        dialog.get_by_text("Output name").first.wait_for()
        page.screenshot(path=str(out.with_name(f"{out.stem}-metadata.png")))
        text = dialog.inner_text()
        browser.close()
    return text


# ------------------------------------------------------------------------------------------------ the check


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--webui", required=True, type=Path, help="the WebUI's folder (launch.py)")
    parser.add_argument("--webui-python", required=True, help="the python of the WebUI's venv")
    parser.add_argument("--work", required=True, type=Path, help="a folder for the tiny model, log and summary")
    parser.add_argument("--family", default="sd1", choices=("sd1", "sd2-v", "sdxl"))
    parser.add_argument("--lora", type=Path, help="a LoRA file our trainer wrote for --base (else one is built)")
    parser.add_argument("--base", type=Path, help="the tiny checkpoint --lora was trained on (else one is written)")
    parser.add_argument("--name", default="", help="the LoRA's name in the WebUI (default: its file stem)")
    parser.add_argument("--port", type=int, default=7861)
    parser.add_argument("--emphasis", default="", help='the WebUI\'s emphasis mode for txt2img, e.g. "No norm"')
    parser.add_argument("--screenshot", type=Path, help="write a screenshot of the Lora card here")
    args = parser.parse_args()

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    models = args.webui / "models"
    if args.base:
        base = models / "Stable-diffusion" / args.base.name
        if base.resolve() != args.base.resolve():  # a base already in the WebUI's models folder stays where it is
            shutil.copy(args.base, base)
            shutil.copy(args.base.with_suffix(".yaml"), base.with_suffix(".yaml"))
    else:
        base = write_base(work, args.family, models)
    say(f"base model: {base}")
    registered = register_open_clip_config(base, args.webui_python)
    if registered:
        say(registered)
    lora_dir = models / "Lora"
    lora_dir.mkdir(parents=True, exist_ok=True)
    name = args.name or (args.lora.stem if args.lora else f"check-{args.family}")
    lora = lora_dir / f"{name}.safetensors"
    if args.lora:
        shutil.copy(args.lora, lora)
        if args.lora.with_suffix(".json").is_file():
            shutil.copy(args.lora.with_suffix(".json"), lora.with_suffix(".json"))
    elif args.family == "sdxl":
        raise SystemExit("--family sdxl needs --lora: a LoRA file our trainer wrote for --base")
    else:
        build_lora(base, lora, args.family)
    from dreambooth.network.files import read_network_file

    network = read_network_file(lora)
    say(f"LoRA: {lora} ({len(network.layers)} layers, {network.algorithm}, {len(network.tensors)} tensors)")

    log_path = work / "webui.log"
    url = f"http://127.0.0.1:{args.port}"
    summary: dict[str, object] = {"base": str(base), "lora": str(lora), "layers": len(network.layers), "url": url}
    process = start_webui(args.webui, args.webui_python, base, args.port, log_path)
    try:
        say(f"WebUI up at {url}; log {log_path}")
        started = log_path.read_text(errors="replace").count("\n")
        call(f"{url}/sdapi/v1/refresh-loras", {}, method="POST")
        listed = {item["name"]: item for item in call(f"{url}/sdapi/v1/loras")}
        entry = listed.get(name)
        summary["listed"] = entry is not None
        summary["listed_metadata"] = sorted((entry or {}).get("metadata", {}))
        say(f"/sdapi/v1/loras lists {name}: {entry is not None}; metadata keys {summary['listed_metadata']}")
        with_lora, info = txt2img(url, f"{PROMPT} <lora:{name}:1>", args.emphasis)
        at_zero, _ = txt2img(url, f"{PROMPT} <lora:{name}:0>", args.emphasis)
        without, _ = txt2img(url, PROMPT, args.emphasis)
        summary["infotext_weight_1"] = info
        summary["max_pixel_difference_1_vs_0"] = int(abs(with_lora - at_zero).max())
        summary["mean_pixel_difference_1_vs_0"] = float(abs(with_lora - at_zero).mean())
        summary["max_pixel_difference_0_vs_none"] = int(abs(at_zero - without).max())
        say(
            f"txt2img <lora:{name}:1> vs <lora:{name}:0>: max |diff| {summary['max_pixel_difference_1_vs_0']}, mean "
            f"{summary['mean_pixel_difference_1_vs_0']:.2f}; <lora:{name}:0> vs no tag: max |diff| "
            f"{summary['max_pixel_difference_0_vs_none']}"
        )
        card = call(f"{url}/sd_extra_networks/get-single-card?page=lora&tabname=txt2img&name={name}")
        summary["card_html_has_name"] = isinstance(card, dict) and name in json.dumps(card)
        if args.screenshot:
            summary["card_dialog_text"] = screenshot(url, name, args.screenshot)
            summary["screenshot"] = str(args.screenshot)
            say(f"screenshot: {args.screenshot}")
    finally:
        stop_webui(process)
        say("WebUI stopped")
    lines = log_path.read_text(errors="replace").splitlines()[started:]
    bad = [line for line in lines if any(b in line.lower() for b in BAD_LINES)]
    loaded = [line for line in lines if "lora" in line.lower() or name in line]
    summary["bad_log_lines"] = bad
    summary["lora_log_lines"] = loaded[:20]
    summary["log_lines_after_start"] = len(lines)
    ok = (
        bool(summary["listed"])
        and summary["max_pixel_difference_1_vs_0"] > 0
        and summary["max_pixel_difference_0_vs_none"] == 0
        and not bad
        and "Lora not found" not in str(summary["infotext_weight_1"])
    )
    summary["ok"] = ok
    (work / "summary.json").write_text(json.dumps(summary, indent=2))
    say(f"log lines after start-up: {len(lines)}; bad lines: {bad or 'none'}")
    say(f"{'OK' if ok else 'FAILED'}: summary in {work / 'summary.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
