"""Differences between the library versions we support, kept in one place.

Tested in both environments: transformers 4.30.2 / diffusers 0.31 (the WebUI's world) and the newest releases.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

TEXT_PREFIX = "text_model."


@contextlib.contextmanager
def quiet_bitsandbytes() -> Iterator[None]:
    """Imports inside this block do not print bitsandbytes' import-time warnings.

    bitsandbytes 0.50 logs a warning about an optional CPU kernel package (4-bit matmul, which we never use) when it
    is imported on a machine without it; diffusers imports bitsandbytes whenever it is installed (its quantizers), and
    8-bit AdamW imports it.  Its loggers are raised to ERROR for the block and restored after (nothing global stays
    changed).
    """
    import logging

    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def text_encoder_state_dict(model: Any) -> dict[str, Any]:
    """The text encoder's weights with transformers-4 names (``text_model.`` prefix), without ``position_ids``.

    transformers 5 drops the ``text_model.`` prefix from ``CLIPTextModel.state_dict()`` and no longer saves
    ``position_ids``; transformers 4.30 has both.  ``CLIPTextModelWithProjection`` (SDXL's second encoder) keeps
    its ``text_model`` wrapper in both, beside ``text_projection.weight``, which stays as it is.
    """
    wrapped = hasattr(model, "text_model")
    out = {}
    for key, value in model.state_dict().items():
        if key.endswith("embeddings.position_ids"):
            continue
        out[key if wrapped or key.startswith(TEXT_PREFIX) else TEXT_PREFIX + key] = value
    return out


def load_text_encoder_state_dict(model: Any, state_dict: dict[str, Any], assign: bool = False) -> None:
    """Load weights named as :func:`text_encoder_state_dict` returns them into a ``CLIPTextModel`` (strict).

    ``assign=True`` adopts the given tensors instead of copying them (for a model built on the meta device).
    """
    own = model.state_dict()
    uses_prefix = any(k.startswith(TEXT_PREFIX) for k in own)
    converted = {}
    for key, value in state_dict.items():
        name = key if uses_prefix else key.removeprefix(TEXT_PREFIX)
        converted[name] = value
    for key, value in own.items():
        if key.endswith("embeddings.position_ids"):
            converted[key] = value  # a buffer derived from the config, not a trained weight
    model.load_state_dict(converted, strict=True, assign=assign)


def text_final_layer_norm(model: Any) -> Any:
    """CLIP's final layer norm: ``model.text_model.final_layer_norm`` (transformers 4) or ``model.final_layer_norm``."""
    inner = getattr(model, "text_model", model)
    return inner.final_layer_norm


def fix_legacy_diffusers_keys(model: Any, state_dict: dict[str, Any]) -> None:
    """Rename, in place, the attention keys of diffusers folders written before diffusers 0.14 (``query``, ``key``,
    ``value``, ``proj_attn`` in the VAE), as ``from_pretrained`` does: the method is ``_fix_state_dict_keys_on_load``
    in current diffusers and ``_convert_deprecated_attention_blocks`` in 0.31."""
    for name in ("_fix_state_dict_keys_on_load", "_convert_deprecated_attention_blocks"):
        fix = getattr(model, name, None)
        if fix is not None:
            fix(state_dict)
            return


# transformers 5 without torchvision: resolving ``CLIPImageProcessor`` (as importing diffusers' Stable Diffusion
# pipeline module does) logs that it falls back to the PIL processor.  We never use an image processor.
_TORCHVISION_FALLBACK = "requires torchvision (not installed); falling back to"


class _DropTorchvisionFallback:
    def filter(self, record: Any) -> bool:
        return _TORCHVISION_FALLBACK not in str(record.msg)


@contextlib.contextmanager
def quiet_library_notices() -> Iterator[None]:
    """Inside: transformers' image-processor fallback notice is dropped and its progress bars are off.

    Only for the duration of the call: the filter is removed and the progress-bar switch restored on exit, so
    nothing changes for the rest of the process (the WebUI's own logging included).
    """
    import logging

    from transformers.utils import logging as transformers_logging

    logger = logging.getLogger("transformers.utils.import_utils")
    drop = _DropTorchvisionFallback()
    bars = transformers_logging.is_progress_bar_enabled()
    logger.addFilter(drop)
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.removeFilter(drop)
        if bars:
            transformers_logging.enable_progress_bar()
