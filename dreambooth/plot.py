"""A loss curve as a small PNG, drawn with Pillow (no plotting library needed)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def plot_losses(points: list[tuple[int, float]], path: str | Path, title: str = "training loss") -> Path:
    """Raw losses in light grey, a moving average in blue, step on x, loss on y."""
    width, height, margin = 640, 360, 48
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((margin, 12), title, fill="black")
    if points:
        steps = [p[0] for p in points]
        losses = [p[1] for p in points]
        low, high = min(losses), max(losses)
        span = (high - low) or 1.0
        first, last = steps[0], steps[-1]
        spread = (last - first) or 1

        def xy(step: float, loss: float) -> tuple[float, float]:
            x = margin + (step - first) / spread * (width - 2 * margin)
            y = height - margin - (loss - low) / span * (height - 2 * margin)
            return x, y

        draw.line([(margin, height - margin), (width - margin, height - margin)], fill="black")
        draw.line([(margin, margin), (margin, height - margin)], fill="black")
        raw = [xy(s, v) for s, v in points]
        average = [xy(s, v) for s, v in zip(steps, smooth(losses, max(1, len(losses) // 10)))]
        if len(raw) > 1:
            draw.line(raw, fill=(200, 200, 200), width=1)
            draw.line(average, fill=(30, 90, 200), width=2)
        draw.text((margin, height - margin + 8), f"step {first}", fill="black")
        draw.text((width - margin - 60, height - margin + 8), f"step {last}", fill="black")
        draw.text((4, margin - 14), f"{high:.3f}", fill="black")
        draw.text((4, height - margin - 4), f"{low:.3f}", fill="black")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
