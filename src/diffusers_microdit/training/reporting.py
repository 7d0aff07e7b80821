"""What a training run shows: validation image grids and the loss curve, as PNG files and in the trackers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from diffusers.utils import make_image_grid
from PIL import Image


def image_grid(images: list[Image.Image], max_columns: int = 8) -> Image.Image:
    """One grid image, `max_columns` wide at most (the last row padded with black)."""
    columns = min(max_columns, len(images))
    rows = math.ceil(len(images) / columns)
    padding = [Image.new("RGB", images[0].size)] * (rows * columns - len(images))
    return make_image_grid(list(images) + padding, rows=rows, cols=columns)


def log_images(accelerator, tag: str, images: list[Image.Image], captions: list[str], step: int) -> None:
    """Send validation images to every active tracker (TensorBoard and W&B are understood)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.stack([np.asarray(image) for image in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: [wandb.Image(image, caption=caption) for image, caption in zip(images, captions)]}, step=step)


class LossHistory:
    """(step, loss) pairs of the whole run, kept across resumes inside each checkpoint, drawn as `loss.png`."""

    filename = "loss_history.json"

    def __init__(self):
        self.steps: list[int] = []
        self.losses: list[float] = []

    def append(self, step: int, loss: float) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def save(self, folder: str | Path) -> None:
        Path(folder, self.filename).write_text(json.dumps({"steps": self.steps, "losses": self.losses}))

    def load(self, folder: str | Path) -> None:
        path = Path(folder, self.filename)
        if path.exists():
            data = json.loads(path.read_text())
            self.steps, self.losses = data["steps"], data["losses"]

    def plot(self, path: str | Path, title: str = "training loss") -> None:
        """Raw per-step loss and a moving average, log-scaled (diffusion losses span decades)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(7, 4), dpi=100)
        axis.plot(self.steps, self.losses, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        window = max(1, len(self.losses) // 50)
        if len(self.losses) >= window > 1:
            smooth = np.convolve(self.losses, np.ones(window) / window, mode="valid")
            axis.plot(self.steps[window - 1 :], smooth, color="tab:blue", label=f"mean of {window}")
        axis.set_yscale("log")
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("loss")
        axis.set_title(title)
        axis.legend()
        axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(path)
        plt.close(figure)
