"""What the WebUI's Lora extension shows and inserts for a trained LoRA file: its prompt tag, its card's sidecar.

Facts of AUTOMATIC1111 v1.10.1 (``extensions-builtin/Lora``, ``modules/extra_networks.py``) this follows:

- A network is named by its file stem; the prompt syntax ``<lora:NAME:WEIGHT>`` is parsed with ``<(\\w+):([^>]+)>``,
  its arguments split on ``:`` and an argument holding ``=`` is a named one: a stem with ``:``, ``>`` or ``=`` cannot
  be written into a prompt.
- ``NAME.json`` beside the file is the card's user metadata: ``"activation text"`` is appended to the inserted prompt
  and ``"sd version"`` (``SD1``, ``SD2``, ``SDXL``, ``Unknown``) decides for which loaded models the card is shown;
  other keys (``description``, ``notes``, ``preferred weight``, ...) belong to the user, who edits them in the card.
- Without that key the version is read from the file's metadata: ``ss_base_model_version`` starting with ``sdxl_``
  is SDXL, ``ss_v2 == "True"`` SD2, any other metadata SD1, none Unknown.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .files import FORBIDDEN_IN_NAME

BASE_MODEL_KEY = "dreambooth.base_model"  # our metadata: the base model the file was trained on
FILEWORDS = "[filewords]"


def prompt_name_problem(name: str, field: str = "model_name") -> str:
    """Why the WebUI could not use a LoRA file named ``name`` in a prompt ('' when it can)."""
    bad = [c for c in FORBIDDEN_IN_NAME if c in name]
    if not bad:
        return ""
    shown = " ".join(f"'{c}'" for c in bad)
    return (
        f"{field}: '{name}' cannot name a LoRA: the WebUI's prompt tag `<lora:NAME:WEIGHT>` cannot hold {shown}; "
        "choose a name without ':', '>' and '='"
    )


def lora_tag(path: str | os.PathLike, weight: float = 1) -> str:
    """The prompt tag that applies the file at ``path`` (named by its stem, as the WebUI names it)."""
    return f"<lora:{Path(path).stem}:{weight:g}>"


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata header of a ``.safetensors`` file (the tensors are not read); {} for other files."""
    if Path(path).suffix.lower() != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return dict(handle.metadata() or {})


def sd_version(metadata: dict[str, str]) -> str:
    """The WebUI's version of a network from its metadata (``network.NetworkOnDisk.detect_version``)."""
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def activation_text(settings: Any) -> str:
    """The words that call up what was trained: the concepts' instance prompts, without ``[filewords]``, once each."""
    texts: list[str] = []
    for concept in settings.concepts:
        text = " ".join(concept.instance_prompt.replace(FILEWORDS, " ").split()).strip(" ,")
        if text and text not in texts:
            texts.append(text)
    return ", ".join(texts)


def write_user_metadata(path: str | os.PathLike, settings: Any) -> Path:
    """Write ``NAME.json`` beside the LoRA file at ``path`` with its ``sd version`` and ``activation text``;
    what the user keeps there under other keys stays.  Atomic.  Returns the sidecar's path."""
    from ..models.files import atomic_path

    sidecar = Path(path).with_suffix(".json")
    data: dict[str, Any] = {}
    if sidecar.is_file():
        try:
            loaded = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            loaded = None  # unreadable: the WebUI could not read it either; ours replaces it
        if isinstance(loaded, dict):
            data = loaded
    data["sd version"] = sd_version(read_metadata(path))
    text = activation_text(settings)
    if text:
        data["activation text"] = text
    with atomic_path(sidecar) as temp:
        temp.write_text(json.dumps(data, indent=4, ensure_ascii=False), encoding="utf-8")
    return sidecar


def base_model_of(path: str | os.PathLike) -> str:
    """The base model recorded in the file's metadata ('' when none)."""
    try:
        return read_metadata(path).get(BASE_MODEL_KEY, "")
    except Exception:  # an unreadable header: the caller says what it cannot do
        return ""
