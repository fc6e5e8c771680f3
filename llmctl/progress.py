"""What a user sees while a stage runs: rich progress for training, and the loss-curve PNG."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from transformers import TrainerCallback

console = Console(stderr=True)


def stage_header(stage: str, detail: str) -> None:
    console.print(f"[bold cyan]llmctl {stage}[/] {detail}")


class RichProgress(TrainerCallback):
    """A progress bar per training run, with the latest loss and the throughput in tokens/s."""

    def __init__(self, description: str, tokens_per_step: int | None = None):
        self.description = description
        self.tokens_per_step = tokens_per_step
        self.progress: Progress | None = None
        self.task = None
        self.fields = {"loss": "", "speed": ""}
        self._last = (0.0, 0)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[loss]} {task.fields[speed]}"), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, transient=False)
        self.progress.start()
        self.task = self.progress.add_task(self.description, total=state.max_steps,
                                           completed=state.global_step, **self.fields)
        self._last = (time.perf_counter(), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is None:
            return
        now = time.perf_counter()
        t0, step0 = self._last
        if self.tokens_per_step and state.global_step > step0 and now - t0 >= 1.0:
            rate = self.tokens_per_step * (state.global_step - step0) / (now - t0)
            self.fields["speed"] = f"{rate:,.0f} tok/s"
            self._last = (now, state.global_step)
        self.progress.update(self.task, completed=state.global_step, **self.fields)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is None or not logs:
            return
        if "loss" in logs:
            self.fields["loss"] = f"loss {logs['loss']:.4f}"
        if "objective/scores" in logs:  # PPO (trl 1.12's log keys): reward, KL, losses
            self.fields["loss"] = (f"reward {logs['objective/scores']:.3f} "
                                   f"kl {logs['objective/kl']:.3f} "
                                   f"policy {logs['loss/policy_avg']:.3f} "
                                   f"value {logs['loss/value_avg']:.3f}")
            if not console.is_terminal:
                self.progress.console.print(f"  step {state.global_step}: {self.fields['loss']}")
        if "eval_loss" in logs:
            self.progress.console.print(f"  step {state.global_step}: eval_loss {logs['eval_loss']:.4f}")
        elif "loss" in logs and not console.is_terminal:
            # Logs of non-interactive runs (CI, nohup) still show the curve as it goes.
            self.progress.console.print(f"  step {state.global_step}: loss {logs['loss']:.4f}")
        self.progress.update(self.task, **self.fields)

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def save_loss_curve(log_history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

