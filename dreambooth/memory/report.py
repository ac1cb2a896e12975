"""An estimate and what would fit, as text for the CLI and the log and as Markdown for the tab.

Reads only an estimate's fields (``total_bytes``, ``breakdown``, ``constants``, ``arch_name``): no gradio.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .fit import GIB, changes_text

if TYPE_CHECKING:
    from ..settings import Settings
    from .estimate import Estimate
    from .fit import Suggestion


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


def mib(size: float) -> str:
    return f"{size / 2**20:,.0f} MiB"


def estimate_text(estimate: Estimate) -> str:
    """One line: the total, then each part of the breakdown and each constant."""
    parts = {**estimate.breakdown, **estimate.constants}
    return f"peak {gib(estimate.total_bytes)}: " + ", ".join(f"{name} {gib(size)}" for name, size in parts.items())


def verdict(estimate: Estimate, gpu_bytes: int | None) -> str:
    if gpu_bytes is None:
        return "GPU size not known (set gpu_memory_gb, or run where the GPU is): no fit check."
    if estimate.total_bytes <= gpu_bytes:
        return f"Fits a {gpu_bytes / GIB:.1f} GiB GPU ({gib(gpu_bytes - estimate.total_bytes)} to spare)."
    return f"Does not fit a {gpu_bytes / GIB:.1f} GiB GPU: {gib(estimate.total_bytes - gpu_bytes)} too much."


def suggestions_text(found: list[Suggestion], gpu_bytes: int) -> str:
    """The "what would fit" list, numbered, cheapest first."""
    if not found:
        return f"Nothing this tool knows makes it fit {gpu_bytes / GIB:.1f} GiB."
    lines = [f"What would fit {gpu_bytes / GIB:.1f} GiB (cheapest first):"]
    for number, suggestion in enumerate(found, start=1):
        lines.append(f"  {number}. {changes_text(suggestion.changes)}: {gib(suggestion.estimate.total_bytes)}")
        lines.append(f"     cost: {suggestion.cost}")
    return "\n".join(lines)


def estimate_markdown(
    estimate: Estimate,
    gpu_bytes: int | None,
    found: list[Suggestion] | None = None,
    preset: dict[str, Any] | None = None,
    failures: dict[str, str] | None = None,
) -> str:
    """The tab's panel: total, breakdown table, the verdict for the GPU and, when it does not fit, the list.

    ``preset``: the changes ``low_memory`` makes (the estimate is of the settings with them); ``failures``: the
    changes whose dry run failed and were left out, with why."""
    total = estimate.total_bytes
    lines = [f"**Estimated peak GPU memory: {gib(total)}** ({mib(total)}; {estimate.arch_name}, one training step)"]
    if preset is not None:
        lines.append(f"With *Fit my GPU* (low_memory): {changes_text(preset)}.")
    lines += ["", "| part | MiB |", "|---|---:|"]
    lines += [f"| {name} | {size / 2**20:,.0f} |" for name, size in estimate.breakdown.items()]
    lines += [f"| {name} (constant) | {size / 2**20:,.0f} |" for name, size in estimate.constants.items()]
    lines += ["", verdict(estimate, gpu_bytes)]
    if found and gpu_bytes is not None:
        lines += ["", f"**What would fit {gpu_bytes / GIB:.1f} GiB** (cheapest first):", ""]
        for suggestion in found:
            lines.append(
                f"- `{changes_text(suggestion.changes)}`: {gib(suggestion.estimate.total_bytes)}; {suggestion.cost}"
            )
    elif found is not None and gpu_bytes is not None and estimate.total_bytes > gpu_bytes:
        lines += ["", "Nothing in the list of memory switches makes it fit."]
    if failures:
        lines += ["", "Left out, the estimate cannot follow them:"]
        lines += [f"- `{changes}`: {why}" for changes, why in failures.items()]
    return "\n".join(lines)


def fit_markdown(
    settings: Settings,
    estimate_fn: Callable[..., Estimate] | None = None,
    memo: dict[Any, Estimate] | None = None,
    quick: bool = False,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """The estimate of ``settings`` as the trainer would run them (with ``low_memory``: the fit preset applied)
    and, when the GPU's size is known and they do not fit, what would.

    ``quick``: only the estimate of the settings as they are (one dry run), with a line saying that the rest is on
    its way.  ``memo`` / ``should_stop``: see :class:`~dreambooth.memory.fit.Fitter` (``Superseded`` passes)."""
    from ..errors import DreamBoothError
    from .fit import Fitter, Superseded, gpu_bytes_for

    if not settings.pretrained_model_name_or_path:
        return "Choose a base model to see the memory estimate."
    fitter = Fitter(settings, estimate_fn=estimate_fn, memo=memo, should_stop=should_stop)
    gpu_bytes = gpu_bytes_for(settings)
    try:
        estimate = fitter.estimate()
        if quick:
            text = estimate_markdown(estimate, gpu_bytes)
            if settings.low_memory:
                return text + "\n\n*Working out what Fit my GPU turns on...*"
            if gpu_bytes is not None and estimate.total_bytes > gpu_bytes:
                return text + "\n\n*Working out what would fit...*"
            return text
        if settings.low_memory:
            if gpu_bytes is None:
                preset = fitter.every_switch()
                estimate = fitter.estimate(preset)
            else:
                preset, estimate = fitter.fit_preset(gpu_bytes)
            return estimate_markdown(estimate, gpu_bytes, preset=preset, failures=fitter.failures)
        found = fitter.suggestions(gpu_bytes) if gpu_bytes is not None and estimate.total_bytes > gpu_bytes else None
    except Superseded:
        raise
    except DreamBoothError as error:
        return f"**No memory estimate:** {error}"
    except Exception as error:  # the panel advises: a failed estimate must not break the page
        return f"**No memory estimate:** {type(error).__name__}: {str(error)[:300]}"
    return estimate_markdown(estimate, gpu_bytes, found, failures=fitter.failures)
