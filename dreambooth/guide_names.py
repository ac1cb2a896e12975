"""Settings names of the community guide that are not our field names: translated, or accepted and ignored.

Users arrive with the guide's configs: its parameter table (ShivamShrirao's ``train_dreambooth.py`` arguments) and
its notebook (CCRcmcpe's fork).  Plain renames are field aliases in :mod:`dreambooth.settings`; this module handles
the rest, in files of every schema version:

* names whose meaning we store differently (``use_8bit_adam`` -> ``optimizer``, ``not_cache_latents`` -> the
  opposite of ``cache_latents``, ``read_prompt_from_txt`` -> ``use_txt_as_label``, ``wandb`` -> ``report_to``, ...);
* the guide's flat concept fields (``instance_data_dir``, ``class_negative_prompt``, ...) next to or instead of
  ``concepts``, and ``concepts_list`` (the path of a ``concepts_list.json``);
* names that do nothing here (the hub parameters -- nothing here talks to a model hub -- ``local_rank``,
  ``last_epoch``): accepted, and each reported as ignored with a sentence, never silently.

Every translation or omission that changes what the file says is reported as a note; a contradiction (``use_8bit_adam``
true and ``optimizer`` adamw) is a problem.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# The guide's flat single-concept fields (the concept's fields that are not also top-level settings).
FLAT_CONCEPT_FIELDS = (
    "instance_data_dir",
    "instance_prompt",
    "class_data_dir",
    "class_prompt",
    "class_negative_prompt",
)

HUB = "nothing here talks to a model hub"
IGNORED = {
    "revision": f"'revision' ({{value}}) is ignored: it picks a version of a model on the Hugging Face hub and {HUB}; "
    "the base model is the file or folder in pretrained_model_name_or_path",
    "tokenizer_name": "'tokenizer_name' ({value}) is ignored: the tokenizer is always the base model's own (SD 1.x and "
    "2.x share CLIP's vocabulary, and a different one would not match the text encoder's embeddings)",
    "push_to_hub": f"'push_to_hub' is ignored: {HUB}; the checkpoints stay on this machine",
    "hub_token": f"'hub_token' is ignored and not kept: {HUB}",
    "hub_model_id": f"'hub_model_id' ({{value}}) is ignored: {HUB}",
    "local_rank": "'local_rank' ({value}) is ignored: the launcher sets each process's rank (train --num-processes N, "
    "or accelerate launch)",
    "last_epoch": "'last_epoch' ({value}) is ignored: to continue a run, set resume_from to its training state, which "
    "restores the learning-rate schedule exactly",
}
# Values meaning "not given" in the guide's argparse configs: these are dropped without a note.
_UNSET = (None, "", False, -1)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _convert(
    data: dict[str, Any], name: str, target: str, value: Any, notes: list[str], problems: list[str], why: str
) -> None:
    """Set ``target`` from the guide's ``name``; a different explicit ``target`` is a contradiction."""
    if target in data and data[target] != value:
        problems.append(
            f"'{name}' says {target} {_show(value)} but '{target}' is {_show(data[target])}: keep one of the two"
        )
        return
    data[target] = value
    notes.append(f"'{name}' was read as {target} = {_show(value)} ({why})")


def _flag(data: dict[str, Any], name: str, problems: list[str]) -> bool | None:
    value = data.pop(name)
    if isinstance(value, bool):
        return value
    if value is None:
        return None
    problems.append(f"'{name}' must be true or false, not {_show(value)}")
    return None


def _concepts_list(value: Any, base_dir: str | os.PathLike | None, problems: list[str]) -> list[Any] | None:
    if not isinstance(value, str) or not value:
        problems.append(f"'concepts_list' must be the path of a concepts_list.json file, not {_show(value)}")
        return None
    path = Path(value)
    if not path.is_absolute() and base_dir is not None:
        path = Path(base_dir) / path
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError, RecursionError) as error:
        problems.append(f"concepts_list: cannot read '{str(path)[:300]}' ({str(error)[:200]})")
        return None
    if not isinstance(items, list):
        problems.append(f"concepts_list: '{path}' must hold a JSON list of concept objects")
        return None
    for item in items:  # relative folders are relative to the list's own folder, as for the tab's import
        if isinstance(item, dict):
            for key in ("instance_data_dir", "class_data_dir"):
                folder = item.get(key)
                if isinstance(folder, str) and folder and "\0" not in folder and not Path(folder).is_absolute():
                    item[key] = str((path.parent / folder).resolve())
    return items


def _flat_concept_fields(data: dict[str, Any], notes: list[str], problems: list[str]) -> None:
    flat = {key: data.pop(key) for key in FLAT_CONCEPT_FIELDS if key in data}
    flat = {key: value for key, value in flat.items() if value is not None}
    if not flat:
        return
    concepts = data.get("concepts")
    if not concepts:
        data["concepts"] = [flat]
        return
    if not isinstance(concepts, list) or not all(isinstance(c, dict) for c in concepts):
        return  # from_dict names the broken concepts
    data["concepts"] = concepts = [dict(c) for c in concepts]  # the caller's dicts stay as they were
    for key, value in flat.items():
        if key == "class_negative_prompt" or len(concepts) == 1:
            for number, concept in enumerate(concepts, start=1):
                if concept.get(key) in (None, ""):
                    concept[key] = value
                elif concept[key] != value:
                    where = "the concept" if len(concepts) == 1 else f"concept {number}"
                    if key == "class_negative_prompt":
                        notes.append(f"top-level '{key}' is not used for {where}, which has its own")
                    else:
                        problems.append(
                            f"'{key}' is given at the top level ({_show(value)}) and differs in {where} "
                            f"({_show(concept[key])}): keep one"
                        )
        else:
            problems.append(f"top-level '{key}' with {len(concepts)} concepts: give it inside each concept instead")


def translate_guide_names(
    data: dict[str, Any], base_dir: str | os.PathLike | None, notes: list[str], problems: list[str]
) -> dict[str, Any]:
    """Rewrite the guide's names in a (migrated) settings dict; append notes and problems as sentences."""
    data = dict(data)
    for name, sentence in IGNORED.items():
        if name in data:
            value = data.pop(name)
            if value not in _UNSET:
                notes.append(sentence.format(value=_show(value)))

    if "concepts_list" in data:
        items = _concepts_list(data.pop("concepts_list"), base_dir, problems)
        if items is not None:
            if data.get("concepts"):
                problems.append("'concepts_list' and 'concepts' are both given: keep one")
            else:
                data["concepts"] = items
    _flat_concept_fields(data, notes, problems)

    if "use_8bit_adam" in data:
        flag = _flag(data, "use_8bit_adam", problems)
        if flag is not None:
            _convert(data, "use_8bit_adam", "optimizer", "adamw_8bit" if flag else "adamw", notes, problems, "guide")
    if "not_cache_latents" in data:
        flag = _flag(data, "not_cache_latents", problems)
        if flag is not None:
            _convert(data, "not_cache_latents", "cache_latents", not flag, notes, problems, "the opposite")
    if "enable_xformers_memory_efficient_attention" in data:
        flag = _flag(data, "enable_xformers_memory_efficient_attention", problems)
        if flag is not None:
            attention = "xformers" if flag else "sdpa"
            _convert(data, "enable_xformers_memory_efficient_attention", "attention", attention, notes, problems, "")
    if "wandb" in data:
        flag = _flag(data, "wandb", problems)
        if flag:
            _convert(data, "wandb", "report_to", "wandb", notes, problems, "the notebook's flag")
    if "log_with" in data and data["log_with"] is None:
        data.pop("log_with")  # the guide's "not given"
    if "read_prompt_from_txt" in data:
        value = data.pop("read_prompt_from_txt")
        if value in (None, False, "no", ""):
            pass
        elif value in (True, "instance", "class", "both"):
            why = "captions from IMAGE.txt"
            if value in ("instance", "class"):
                why += f"; for instance and class images alike, not only {value} images"
            _convert(data, "read_prompt_from_txt", "use_txt_as_label", True, notes, problems, why)
        else:
            problems.append(f"'read_prompt_from_txt' must be no, instance, class or both, not {_show(value)}")
    if "auto_test_model" in data:
        flag = _flag(data, "auto_test_model", problems)
        given = [key for key in ("test_prompt", "test_prompts_file") if data.get(key)]
        if flag is False and given:
            for key in given:
                data.pop(key)
            notes.append(
                f"auto_test_model is false, so {' and '.join(given)} are not used (here a test prompt alone "
                "turns the test images on)"
            )
        elif flag and not given:
            notes.append("auto_test_model is true but there is no test_prompt or test_prompts_file: no test images")
    return data
