"""What a run shows and leaves behind: a live bar, metrics.jsonl, TensorBoard events, a loss plot, a summary.

Only rank 0 reports (`RunLog(enabled=False)` on other ranks does nothing), so the loop
can call it unconditionally.
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tunesmith.train.files import METRICS_FILE, TENSORBOARD_DIR


def format_duration(seconds: float) -> str:
    """`45 s`, `3 min 05 s`, `2 h 07 min`: an ETA a person reads at a glance."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Pace:
    """Seconds per step from the wall clock between bar updates: an ETA from the second update on."""

    def __init__(self, total_steps: int) -> None:
        self.total = total_steps
        self.first: tuple[float, int] | None = None  # (time, step) of the first update
        self.announced = False

    def eta(self, step: int, now: float | None = None) -> float | None:
        """Seconds left, or None until two updates have been seen."""
        now = time.perf_counter() if now is None else now
        if self.first is None:
            self.first = (now, step)
            return None
        t0, s0 = self.first
        if step <= s0:
            return None
        return (self.total - step) * (now - t0) / (step - s0)


class RunLog:
    """The progress bar plus the metric sinks of one run."""

    def __init__(self, output_dir: Path, total_steps: int, *, start_step: int = 0,
                 history: list[dict[str, Any]] | None = None, enabled: bool = True, show_bar: bool = True,
                 bar_metrics: tuple[str, ...] = ()) -> None:
        self.output_dir = output_dir
        self.bar_metrics = bar_metrics  # the objective's metrics worth a place on the bar (beside the loss)
        self.enabled = enabled
        self.history: list[dict[str, Any]] = list(history or [])
        self._bar: Any = None
        self._task: Any = None
        self._tb: Any = None
        self._pace = Pace(total_steps)
        if not enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        # metrics.jsonl is rewritten from the history: a resumed run drops what came after its checkpoint
        with (output_dir / METRICS_FILE).open("w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in self.history)
        from torch.utils.tensorboard import SummaryWriter

        self._tb = SummaryWriter(str(output_dir / TENSORBOARD_DIR), purge_step=start_step + 1 if start_step else None)
        if show_bar:
            self._start_bar(total_steps, start_step)

    def _start_bar(self, total_steps: int, start_step: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._bar = Progress(
            TextColumn("[bold]train"), BarColumn(bar_width=16), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            console=Console(file=sys.stderr), transient=False)
        self._task = self._bar.add_task("train", total=total_steps, completed=start_step, info="")
        self._bar.start()

    def log(self, record: dict[str, Any]) -> None:
        """Record one metrics dict (must hold "step"): JSONL line, TensorBoard scalars, history."""
        if not self.enabled:
            return
        self.history.append(record)
        with (self.output_dir / METRICS_FILE).open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._tb.add_scalar(key.replace("_", "/", 1) if key.startswith(("train_", "eval_")) else key,
                                    value, record["step"])

    def advance(self, step: int, epoch: float, loss: float, lr: float, tokens_per_s: float,
                metrics: dict[str, float] | None = None) -> None:
        """Move the bar to `step` and show the latest figures (and the `bar_metrics` among `metrics`);
        once the pace is known, say it in a line.

        The line (speed and ETA after the first steps) also reaches logs where the bar is not
        redrawn, so a slow machine shows within seconds how long the run will take.
        """
        if not self.enabled:
            return
        eta = self._pace.eta(step)
        left = f"ETA {format_duration(eta)}" if eta is not None else "ETA …"
        if self._bar is not None:
            shown = "".join(f" {k.replace('_', ' ')} {(metrics or {})[k]:.3g}" for k in self.bar_metrics
                            if k in (metrics or {}))
            info = f"{left}  epoch {epoch:.2f} loss {loss:.4f}{shown} lr {lr:.1e} {tokens_per_s:,.0f} tok/s"
            self._bar.update(self._task, completed=step, info=info)
        if eta is not None and not self._pace.announced:
            self._pace.announced = True
            self.message(f"speed: {tokens_per_s:,.0f} tokens/s; about {format_duration(eta)} for the remaining "
                         f"{self._pace.total - step} steps")

    def message(self, text: str) -> None:
        """A line printed above the bar (evaluations, checkpoints)."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.console.print(text)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        """Stop the bar and flush TensorBoard."""
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path:
    """Train and eval loss against steps, as a PNG (headless: matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["train_loss"]) for r in history if "train_loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in history if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def format_summary(metrics: dict[str, Any]) -> str:
    """The few lines printed at the end of a run."""
    def fmt(key: str, spec: str = ".4f") -> str:
        value = metrics.get(key)
        return "n/a" if value is None else format(value, spec)

    return "\n".join([
        f"steps {metrics.get('steps', 0)}  tokens {metrics.get('tokens', 0):,}  time {fmt('seconds', '.1f')} s  "
        f"({fmt('tokens_per_s', ',.0f')} tokens/s)",
        f"eval loss: base {fmt('base_eval_loss')}  final {fmt('final_eval_loss')}  best {fmt('best_eval_loss')}"
        f"  (perplexity {fmt('final_eval_perplexity', '.2f')})",
        *objective_line(metrics),
        f"peak memory {fmt('peak_memory_gib', '.2f')} GiB",
    ])


def objective_line(metrics: dict[str, Any]) -> list[str]:
    """The objective's own held-out metrics, base -> final, in one line (none for SFT)."""
    names = [k.removeprefix("final_eval_") for k in metrics if k.startswith("final_eval_")
             and k not in ("final_eval_loss", "final_eval_perplexity")]
    parts = [f"{n.replace('_', ' ')} {metrics.get('base_eval_' + n, float('nan')):.3g} -> "
             f"{metrics['final_eval_' + n]:.3g}" for n in names]
    return [f"eval (base -> final): {', '.join(parts)}"] if parts else []
