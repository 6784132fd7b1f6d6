"""Optional Weights & Biases logging of a ``train-sae`` run.

Every metric the trainer records (every ``log_every`` steps: loss, MSE, FVU, L0, dead fraction,
learning rate, the architecture's loss terms) goes to W&B as ``<experiment>/<metric>`` at the
training step, the run's config holds the command's settings and each experiment's
hyperparameters, and the held-out results end in the run summary. Runs live under
``<out>/wandb``; ``WANDB_MODE=offline`` keeps them on disk (``wandb sync`` uploads later).
Only rank 0 logs under ``torchrun``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainers.trainer import Trainer

WANDB_DIR = "wandb"


class WandbLog:
    """Call after each training step; :meth:`finish` with the final table rows."""

    def __init__(self, project: str, name: str | None, config: dict[str, Any], out_dir: Path):
        try:
            import wandb
        except ImportError:
            raise ValueError("--wandb needs the wandb package; pip install wandb, or leave --wandb out") from None
        (out_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name, config=config, dir=str(out_dir))

    def __call__(self, trainer: Trainer) -> None:
        metrics: dict[str, float] = {}
        for run in trainer.runs:
            last = run.history[-1] if run.history else None
            if last is not None and last["step"] == trainer.step:
                metrics.update({f"{run.exp.name}/{k}": v for k, v in last.items() if k != "step"})
        if metrics:
            self.run.log(metrics, step=trainer.step)

    def finish(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            for key, value in row.items():
                if key != "name" and isinstance(value, int | float):
                    self.run.summary[f"{row['name']}/{key}"] = value
        self.run.finish()
