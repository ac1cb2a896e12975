"""Training logs: tensorboard's ``SummaryWriter`` or wandb, behind one two-method object."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DreamBoothError


class TensorboardLogger:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as error:
            raise DreamBoothError(
                "report_to tensorboard needs the tensorboard package: 'pip install tensorboard', or set report_to none"
            ) from error
        folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(log_dir=str(folder))

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    def __init__(self, folder: Path, config: dict[str, Any]):
        try:
            import wandb
        except ImportError as error:
            raise DreamBoothError(
                "report_to wandb needs the wandb package: 'pip install wandb' (and 'wandb login'), "
                "or set report_to none"
            ) from error
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project="dreambooth", dir=str(folder), config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def make_logger(report_to: str, folder: Path, config: dict[str, Any]) -> Any:
    if report_to == "tensorboard":
        return TensorboardLogger(folder)
    if report_to == "wandb":
        return WandbLogger(folder, config)
    return None
