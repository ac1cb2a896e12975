"""Text the tab shows about a job and a dataset, made from plain data (no gradio, so it is tested directly)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..runner import JobSnapshot

MAX_PLOT_POINTS = 500


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def status_markdown(snapshot: JobSnapshot) -> str:
    """One block: state and phase, step / total, s/step, ETA, loss, peak memory, and the error if any."""
    if snapshot.state == "idle":
        return "**Idle.** Fill in a concept and press Train."
    p = snapshot.progress
    head = {
        "running": "Training",
        "finished": "Finished",
        "cancelled": "Cancelled (a resumable state was saved)",
        "failed": "Failed",
    }.get(snapshot.state, snapshot.state)
    lines = [f"**{head}: {snapshot.model_name}** ({p.phase})"]
    if p.total_steps:
        lines.append(f"step {p.step} / {p.total_steps}")
    details = []
    if p.seconds_per_step is not None:
        details.append(f"{p.seconds_per_step:.2f} s/step")
    if p.eta_seconds is not None and snapshot.is_running:
        details.append(f"ETA {_duration(p.eta_seconds)}")
    if p.loss is not None:
        details.append(f"loss {p.loss:.4f}")
    if p.validation_loss is not None:
        details.append(f"validation loss {p.validation_loss:.4f}")
    if p.peak_memory_gib is not None:
        details.append(f"peak memory {p.peak_memory_gib:.2f} GiB")
    if details:
        lines.append(" · ".join(details))
    if p.message and p.message != p.phase:
        lines.append(p.message)
    if snapshot.error:
        lines.append(f"**Error:** {snapshot.error}")
    return "  \n".join(lines)


def existing_files(paths: tuple[str, ...] | list[str]) -> list[str]:
    """The paths that are still files: a job's outputs may be deleted while the page shows them (a run folder
    removed by hand), and a gallery given a missing file fails."""
    return [path for path in paths if Path(path).is_file()]


def plot_rows(snapshot: JobSnapshot) -> list[tuple[int, float, str]]:
    """(step, loss, series) of the tab's loss plot: the training loss and, when images are held out, the
    validation loss, each thinned as :func:`loss_points`."""
    rows = [(step, loss, "training") for step, loss in loss_points(snapshot)]
    return rows + [(step, loss, "validation") for step, loss in loss_points(snapshot, snapshot.validation_losses)]


def loss_points(snapshot: JobSnapshot, points: Any = None) -> list[tuple[int, float]]:
    """The loss curve (``points``, default the training loss), thinned to at most :data:`MAX_PLOT_POINTS` points
    (the last one always kept)."""
    losses = list(snapshot.losses if points is None else points)
    if len(losses) <= MAX_PLOT_POINTS:
        return losses
    stride = -(-len(losses) // MAX_PLOT_POINTS)
    thinned = losses[::stride]
    return thinned if thinned[-1] == losses[-1] else [*thinned, losses[-1]]


def dataset_markdown(reports: list[tuple[int, str, int, list[tuple[Path, str]]]]) -> str:
    """Per concept: its folder, how many images, and each unusable file with the reason."""
    if not reports:
        return "No concept has an instance folder yet."
    lines = []
    for index, folder, count, problems in reports:
        lines.append(f"**Concept {index}**: {count} image(s) in `{folder}`")
        lines.extend(f"- `{path.name}`: {reason}" for path, reason in problems)
        if not problems and count:
            lines.append("- every image is readable")
    return "\n".join(lines)
