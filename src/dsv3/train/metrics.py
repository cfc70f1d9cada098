"""What a training run shows and records: progress, JSONL metrics, TensorBoard, MFU, and a PNG report.

* `MetricsLog` appends one JSON object per logged step to `metrics.jsonl` (always `step`, `loss`,
  `lr`; plus MTP and balance losses, grad norm, tokens/s, MFU, per-layer expert-load MaxVio and
  the raw expert-load matrix; `val_loss` on evaluation steps). On resume, records after the
  checkpoint's step are dropped, so the file tells one consistent history. A run killed mid-write
  leaves a partial last line: readers drop it (a bad line anywhere else is a DataError naming the
  file and line). TensorBoard scalars are mirrored when asked (tensorboard is imported only then).
* `Progress` is a live rich bar (step, loss, tokens/s, MFU, ETA) on a terminal, and plain lines
  when the output is a file or a pipe.
* MFU = achieved training FLOP/s over the device's peak. FLOP per token follows the convention that
  reproduces the paper's Table 2: 6 x activated parameters (input embedding excluded, head and MTP
  included, routed experts counted k/N) + causal attention 3 x layers x 2 x heads x (d_qk + d_v)
  x seq/2. The peak is measured with a GEMM at start (or given).
* MaxVio (V3R section 4.5.1) of one MoE layer = (max_i load_i - mean load) / mean load.
* `write_report` draws loss curves, learning rate, MaxVio over training, and expert-load heat maps
  (MoE layer x expert) at the first and last logged step, i.e. before and after the router biases
  have balanced the load; given a baseline run (e.g. the bias update off, benchmarks/balance.py), it
  also draws the baseline's MaxVio curve, losses and end-of-run load next to this run's.
  matplotlib is imported only there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from dsv3.errors import DataError


class MetricsLog:
    """Append-only JSONL log (and optional TensorBoard mirror) of per-step records."""

    def __init__(self, path: Path, keep_up_to_step: int | None, tensorboard_dir: Path | None = None) -> None:
        self.path = path
        kept = (
            [] if keep_up_to_step is None else [r for r in read_metrics(path) if r["step"] <= keep_up_to_step]
        )
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(path, "a")  # noqa: SIM115 - open for the whole run
        self._tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(tensorboard_dir), purge_step=keep_up_to_step)

    def log(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] if there is none), without a partial last line."""
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # the run was killed while writing this line
            raise DataError(f"{path} line {number} is not a JSON record ({e}); delete that line") from e
        if record is not None:
            records.append(record)
    return records


def max_violation(load: torch.Tensor) -> list[float]:
    """MaxVio per MoE layer of an expert-load matrix [layers, experts]."""
    mean = load.float().mean(dim=1).clamp_min(1e-9)
    return ((load.float().max(dim=1).values - mean) / mean).tolist()


# ------------------------------------------------------------------------------------- progress
class Progress:
    """A live rich progress bar on a terminal; one plain line per logged step otherwise."""

    def __init__(self, total: int, start: int, live: bool | None = None) -> None:
        self.total = total
        self.live = sys.stdout.isatty() if live is None else live
        if self.live:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as RichProgress

            self._bar = RichProgress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
            )
            self._task = self._bar.add_task("train", total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, info: str, logged: bool) -> None:
        if self.live:
            self._bar.update(self._task, completed=step, info=info)
        elif logged:
            print(f"step {step}/{self.total} {info}", flush=True)

    def print(self, message: str) -> None:
        if self.live:
            self._bar.console.print(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.live:
            self._bar.stop()


# --------------------------------------------------------------------------------------- report
def write_report(
    metrics_path: Path,
    png_path: Path,
    title: str = "",
    baseline: Path | None = None,
    label: str = "",
    baseline_label: str = "baseline",
) -> Path:
    """Loss curves, learning rate, MaxVio and before/after expert-load heat maps in one PNG.

    With `baseline` (another run's metrics.jsonl, e.g. the same run with the router-bias update
    off), a third row compares the two: both loss curves, the baseline's expert-load heat map at
    its last logged step next to this run's, and the final MaxVio per MoE layer of both; the
    MaxVio panel shows both curves. `label` and `baseline_label` name the runs in the legends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    if not records:
        raise DataError(f"{metrics_path} has no records to plot")
    base = read_metrics(baseline) if baseline is not None else None
    if base == []:
        raise DataError(f"{baseline} has no records to plot")
    fig, axes = plt.subplots(3 if base else 2, 3, figsize=(16, 12.75 if base else 8.5), squeeze=False)
    _plot_losses(axes[0, 0], records)
    _plot_series(axes[0, 1], records, ["lr"], "learning rate")
    maxvio = "expert-load MaxVio (mean over MoE layers)"
    _plot_series(axes[0, 2], records, ["maxvio"], maxvio, label)
    _plot_series(axes[1, 0], records, ["grad_norm"], "gradient norm (before clipping)")
    loads = [r for r in records if "expert_load" in r]
    base_loads = [r for r in base or [] if "expert_load" in r]
    shown = [loads[0], loads[-1]] if loads else []
    shown += base_loads[-1:]
    vmax = max((max(map(max, r["expert_load"])) for r in shown), default=1)
    if loads:
        for ax, r, when in ((axes[1, 1], loads[0], "first"), (axes[1, 2], loads[-1], "last")):
            _plot_load(fig, ax, r, f"expert load{_named(label)}, {when} logged step {r['step']}", vmax)
    else:
        for ax in axes[1, 1:]:
            ax.axis("off")
    if base:
        _plot_series(axes[0, 2], base, ["maxvio"], maxvio, baseline_label)
        _plot_series(axes[2, 0], records, ["loss", "val_loss"], "loss (nats/token)", label)
        _plot_series(axes[2, 0], base, ["loss", "val_loss"], "loss (nats/token)", baseline_label)
        if base_loads:
            r = base_loads[-1]
            _plot_load(
                fig, axes[2, 1], r, f"expert load{_named(baseline_label)}, last logged step {r['step']}", vmax
            )
        else:
            axes[2, 1].axis("off")
        _plot_final_maxvio(axes[2, 2], [(records, label or "this run"), (base, baseline_label)])
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _named(label: str) -> str:
    return f" ({label})" if label else ""


def _plot_load(fig: Any, ax: Any, record: dict[str, Any], title: str, vmax: float) -> None:
    im = ax.imshow(record["expert_load"], aspect="auto", cmap="viridis", vmin=0, vmax=vmax)
    ax.set(
        title=title, xlabel="expert", ylabel="MoE layer (then MTP)", yticks=range(len(record["expert_load"]))
    )
    fig.colorbar(im, ax=ax, label="tokens")


def _plot_final_maxvio(ax: Any, runs: list[tuple[list[dict[str, Any]], str]]) -> None:
    """Grouped bars: MaxVio per MoE layer at each run's last logged step."""
    width = 0.8 / len(runs)
    for i, (records, name) in enumerate(runs):
        last = [r for r in records if "maxvio_per_layer" in r]
        if last:
            vio = last[-1]["maxvio_per_layer"]
            ax.bar(
                [j + i * width for j in range(len(vio))], vio, width, label=f"{name}, step {last[-1]['step']}"
            )
    layers = max(
        (len(r[-1]["maxvio_per_layer"]) for r, _ in runs if r and "maxvio_per_layer" in r[-1]), default=0
    )
    ax.set_xticks([j + 0.4 - width / 2 for j in range(layers)], [str(j) for j in range(layers)])
    ax.set(title="final expert-load MaxVio per MoE layer", xlabel="MoE layer (then MTP)")
    ax.legend()


def _plot_losses(ax: Any, records: list[dict[str, Any]]) -> None:
    _plot_series(ax, records, ["loss", "mtp_loss", "val_loss"], "loss (nats/token)")
    baseline = [r["unigram_loss"] for r in records if "unigram_loss" in r]
    if baseline:
        ax.axhline(baseline[-1], color="gray", linestyle="--", label="unigram baseline")
        ax.legend()


def _plot_series(
    ax: Any, records: list[dict[str, Any]], keys: list[str], title: str, label: str = ""
) -> None:
    for key in keys:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if key == "val_loss" else None, label=key + _named(label))
    ax.set(title=title, xlabel="step")
    if ax.get_legend_handles_labels()[0]:  # a run without this series leaves the panel empty
        ax.legend()
