"""The built-in demo: everything offline on the CPU, on a tiny model built on the spot.

Until the trainer lands, the demo exercises the checkpoint layer end to end: it writes a tiny SD 1.x checkpoint
(with the sidecar yaml and CLIP folder the WebUI needs), converts it to a diffusers folder and back, checks that
every tensor survived (fp32 exactly, fp16 within rounding), and renders a sample with a diffusers pipeline built
from the in-memory components.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path


def run_demo(out: Path) -> dict[str, Path]:
    import torch

    from .models.components import load_components, save_diffusers_folder, save_single_file
    from .models.files import read_state_dict
    from .models.tiny import write_tiny_checkpoint

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    models = out / "models"
    base = write_tiny_checkpoint(models, "sd1")
    print(f"[1/4] tiny SD 1.x checkpoint: {base} (+ {base.with_suffix('.yaml').name})")

    components = load_components(base)
    folder = out / "tiny-sd1-diffusers"
    if folder.exists():
        shutil.rmtree(folder)  # the demo's own output from an earlier run
    save_diffusers_folder(components, folder)
    print(f"[2/4] single file -> diffusers folder: {folder} ({components.arch.name})")

    back = load_components(folder)
    results = {}
    original, _ = read_state_dict(base)
    for half in (False, True):
        target = models / f"tiny-sd1-roundtrip{'-fp16' if half else ''}.safetensors"
        save_single_file(back, target, half=half)
        written, _ = read_state_dict(target)
        if set(written) != set(original):
            raise RuntimeError(f"round trip changed the keys: {sorted(set(written) ^ set(original))[:5]}")
        worst = max((written[k].double() - original[k].double()).abs().max().item() for k in original)
        results["fp16" if half else "fp32"] = (target, worst)
    fp32, fp16 = results["fp32"], results["fp16"]
    print(f"[3/4] diffusers folder -> single file: {len(original)} tensors, same keys")
    print(f"      fp32 {fp32[0].name}: largest difference {fp32[1]:.3g} (exact: {fp32[1] == 0})")
    print(f"      fp16 {fp16[0].name}: largest difference {fp16[1]:.3g} (fp16 rounding)")
    if fp32[1] != 0:
        raise RuntimeError("the fp32 round trip is not exact")

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=back.vae,
        text_encoder=back.text_encoder,
        tokenizer=back.tokenizer,
        unet=back.unet,
        scheduler=DDIMScheduler.from_config(back.noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    image = pipe("a photo of sks dog", num_inference_steps=10, height=64, width=64, generator=generator).images[0]
    sample = out / "sample.png"
    image.save(sample)
    print(f"[4/4] sample from the in-memory components (random weights, so it is noise): {sample}")
    print(f"demo finished in {time.perf_counter() - started:.1f} s; files under {out.resolve()}")
    return {"checkpoint": base, "folder": folder, "roundtrip": fp32[0], "sample": sample}
