"""The resumable training state: trained weights (fp32), optimizer, LR schedule, step and RNG.

Written into a temporary folder beside ``output_dir/state`` and swapped in when complete, so a crash while saving
leaves the previous state intact.  Everything is read back with ``weights_only`` loading.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import DreamBoothError

STATE_VERSION = 1


def save_state(
    folder: Path,
    step: int,
    modules: dict[str, Any],
    optimizer: Any,
    lr_scheduler: Any,
    info: dict[str, Any],
    scaler: Any = None,
) -> Path:
    import torch
    from safetensors.torch import save_file

    from ..compat import text_encoder_state_dict

    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, module in modules.items():
            state = text_encoder_state_dict(module) if name == "text_encoder" else module.state_dict()
            save_file(
                {k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(temp / f"{name}.safetensors")
            )
        # The legacy format: the WebUI's safe unpickler (which replaces torch.load inside the WebUI) refuses the
        # entries of the current zip format and makes torch.load return None; it accepts this one.
        legacy = {"_use_new_zipfile_serialization": False}
        torch.save(optimizer.state_dict(), temp / "optimizer.pt", **legacy)
        torch.save(lr_scheduler.state_dict(), temp / "scheduler.pt", **legacy)
        rng = {"cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, temp / "rng.pt", **legacy)
        if scaler is not None:
            torch.save(scaler.state_dict(), temp / "scaler.pt", **legacy)
        (temp / "state.json").write_text(
            json.dumps({"version": STATE_VERSION, "step": step, "modules": sorted(modules), **info}, indent=2)
        )
        old = folder.with_name(folder.name + ".old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        temp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    return folder


def read_state_info(folder: Path) -> dict[str, Any]:
    path = Path(folder) / "state.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DreamBoothError(f"{folder}: not a readable training state ({error}).") from error
    if info.get("version") != STATE_VERSION:
        raise DreamBoothError(f"{folder}: training state version {info.get('version')} is not supported.")
    return info


def load_state(folder: Path, modules: dict[str, Any], optimizer: Any, lr_scheduler: Any, scaler: Any = None) -> int:
    """Restore everything saved by :func:`save_state`; returns the step to continue from."""
    import torch
    from safetensors.torch import load_file

    from ..compat import load_text_encoder_state_dict
    from ..models.safe_pickle import load_pickle

    folder = Path(folder)
    info = read_state_info(folder)
    missing = set(info["modules"]) ^ set(modules)
    if missing:
        raise DreamBoothError(
            f"{folder}: the state trained {sorted(info['modules'])} but these settings train {sorted(modules)}; "
            "resume with the same train_text_encoder setting."
        )
    for name, module in modules.items():
        tensors = load_file(str(folder / f"{name}.safetensors"))
        parameter = next(module.parameters())
        tensors = {k: v.to(parameter.device) for k, v in tensors.items()}
        if name == "text_encoder":
            load_text_encoder_state_dict(module, tensors)
        else:
            module.load_state_dict(tensors, strict=True)
    optimizer.load_state_dict(load_pickle(folder / "optimizer.pt", "training state file"))
    lr_scheduler.load_state_dict(load_pickle(folder / "scheduler.pt", "training state file"))
    rng = load_pickle(folder / "rng.pt", "training state file")
    torch.random.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    if scaler is not None and (folder / "scaler.pt").is_file():
        scaler.load_state_dict(load_pickle(folder / "scaler.pt", "training state file"))
    return int(info["step"])
