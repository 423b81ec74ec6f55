"""Training metrics: one JSON line per optimiser step, TensorBoard scalars, and a loss-curve PNG at the end.

Only the main process writes. On resume, lines and events after the resumed step (written by the killed run
after its last checkpoint) are dropped, so the files describe one consistent run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    def __init__(self, output_dir: str | Path, start_step: int, enabled: bool):
        self.enabled = enabled
        self.path = Path(output_dir) / METRICS_FILE
        self.plot_path = Path(output_dir) / LOSS_PLOT
        self.writer = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in read_metrics(self.path) if line["step"] <= start_step]
            self.path.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(output_dir) / TENSORBOARD_DIR), purge_step=start_step + 1)

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        for name, value in values.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if not self.enabled:
            return
        self.writer.close()
        lines = read_metrics(self.path) if self.path.exists() else []
        if lines:
            plot_loss(lines, self.plot_path)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def plot_loss(lines: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([line["step"] for line in lines], [line["loss"] for line in lines], linewidth=1)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


__all__ = ["LOSS_PLOT", "METRICS_FILE", "MetricsLogger", "plot_loss", "read_metrics"]
