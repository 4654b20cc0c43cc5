"""Result tables and plots of a tuning experiment: plain data in, files out; no Ray.

The rows come from tune.py (one per grid trial, plus reference models such as popularity and
kNN scored once), but anything that builds `ResultRow`s can use these functions:

    rows = [ResultRow(model="mlp", batch_size=16, learning_rate=1e-2, test={...}, val={...}), ...]
    paths = write_report(rows, "out/")   # results.csv, results.md, heatmap.png, curves.png

Lift is a metric divided by the same metric of the popularity baseline (recommend the most
frequent training hashtags to every image): a lift below 1 means the model has learnt nothing
the tag frequencies did not already say.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from hashtag import storage

BASELINE = "popularity"
# Metrics shown first, in this order; any other metric a model reports follows, sorted.
LEADING_METRICS = ("f1", "precision", "recall", "f1@5", "p@5", "r@5", "hit@5", "map")
LIFT_METRICS = ("f1", "f1@5")
# The table people choose a model from (results.md's first, what tune prints): column -> header.
# The validation column of the selection metric is headed "... (decides)": the exported row is
# the best of it; every "test" column is reported, never used to choose.
DECISION_COLUMNS = {
    "model": "model",
    "batch_size": "batch size",
    "learning_rate": "learning rate",
    "val_f1": "val F1",
    "val_f1@5": "val F1@5",
    "f1@5": "test F1@5",
    "p@5": "P@5",
    "r@5": "R@5",
    "map": "mAP",
    "lift_f1@5": "lift F1@5",
    "seconds": "seconds",
}
SELECTED_MARK = " (selected)"
DECIDES_MARK = " (decides)"
SELECT_METRIC = "f1@5"  # tune's default --select-metric (models.SELECT_METRIC)
METRIC_HEADERS = {"f1": "F1", "f1@5": "F1@5", "f1@10": "F1@10", "map": "mAP", "p@5": "P@5"}
# Per-epoch series drawn by plot_curves (others in a row's history are ignored).
CURVE_F1 = ("val_f1", "f1")
CURVE_LOSS = ("loss", "val_loss")


@dataclass(frozen=True)
class ResultRow:
    """One scored model: a grid trial or a reference model.

    test / val: metric name -> value on the test / validation split.
    history:    per-epoch curves, name -> values (e.g. "loss", "val_loss", "val_f1").
    status:     "ok", or why the trial has no result ("error: ...").
    selected:   the row whose model was exported (chosen on validation).
    """

    model: str
    batch_size: int | None = None
    learning_rate: float | None = None
    test: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    seconds: float = math.nan
    epochs: int | None = None
    history: dict[str, list[float]] = field(default_factory=dict)
    status: str = "ok"
    trial_id: str = ""
    selected: bool = False

    @property
    def is_trial(self) -> bool:
        return self.batch_size is not None and self.learning_rate is not None

    @property
    def label(self) -> str:
        if self.is_trial:
            return f"{self.model} bs={self.batch_size} lr={self.learning_rate:g}"
        return self.model


def trial_line(row: ResultRow) -> str:
    """The original project's one-line summary of a trial on the test split."""
    t = row.test
    head = f"Model bs: {row.batch_size} / lr: {row.learning_rate:g}" if row.is_trial else row.model
    if row.status != "ok":
        return f"{head} / {row.status}"
    return (
        f"{head} / f1: {t.get('f1', math.nan):.4f} / pre: {t.get('precision', math.nan):.4f}"
        f" / re: {t.get('recall', math.nan):.4f}"
    )


def metric_names(rows: Sequence[ResultRow]) -> list[str]:
    present = {name for row in rows for name in row.test}
    leading = [m for m in LEADING_METRICS if m in present]
    return leading + sorted(present - set(leading), key=_metric_sort_key)


def _metric_sort_key(name: str) -> tuple[str, int]:
    # "p@10" after "p@5": sort by the prefix, then k as a number.
    prefix, _, k = name.partition("@")
    return (prefix, int(k) if k.isdigit() else -1)


def results_table(
    rows: Sequence[ResultRow], baseline: str = BASELINE, select_metric: str = SELECT_METRIC
) -> list[dict]:
    """One dict per row: identity, validation F1, F1@5 and the selection metric, every test
    metric, lifts, time.

    Trials first (by batch size, then learning rate), then the reference models.
    """
    metrics = metric_names(rows)
    reference = next((r for r in rows if r.model == baseline and not r.is_trial), None)
    ordered = sorted(
        rows, key=lambda r: (not r.is_trial, r.batch_size or 0, -(r.learning_rate or 0), r.model)
    )
    table = []
    for row in ordered:
        record: dict = {
            "model": row.model,
            "batch_size": row.batch_size if row.is_trial else "",
            "learning_rate": row.learning_rate if row.is_trial else "",
            "status": row.status,
            "selected": row.selected,
            "epochs": row.epochs if row.epochs is not None else "",
            "val_f1": row.val.get("f1", math.nan),
            "val_f1@5": row.val.get("f1@5", math.nan),  # what selection uses by default
        }
        record[f"val_{select_metric}"] = row.val.get(select_metric, math.nan)
        for name in metrics:
            record[name] = row.test.get(name, math.nan)
        for name in LIFT_METRICS:
            base = reference.test.get(name, math.nan) if reference else math.nan
            value = row.test.get(name, math.nan)
            record[f"lift_{name}"] = value / base if base and base > 0 else math.nan
        record["seconds"] = row.seconds
        table.append(record)
    return table


def drop_empty_columns(table: list[dict]) -> list[dict]:
    """Without the columns that no row fills (e.g. batch size for reference models only)."""

    def empty(value) -> bool:
        return value == "" or value is None or (isinstance(value, float) and math.isnan(value))

    keep = [c for c in (table[0] if table else {}) if not all(empty(r[c]) for r in table)]
    return [{c: r[c] for c in keep} for r in table]


def to_csv(table: list[dict]) -> str:
    if not table:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(table[0]), lineterminator="\n")
    writer.writeheader()
    for record in table:
        writer.writerow({k: _format(v, csv=True) for k, v in record.items()})
    return buffer.getvalue()


def decision_columns(select_metric: str = SELECT_METRIC) -> dict[str, str]:
    """DECISION_COLUMNS with the selection metric's validation column headed "(decides)" (added
    after val F1@5 when it is not one of the two)."""
    decides = f"val_{select_metric}"
    columns: dict[str, str] = {}
    for column, header in DECISION_COLUMNS.items():
        columns[column] = header + (DECIDES_MARK if column == decides else "")
        if column == "val_f1@5" and decides not in DECISION_COLUMNS:
            name = METRIC_HEADERS.get(select_metric, select_metric)
            columns[decides] = f"val {name}{DECIDES_MARK}"
    return columns


def decision_table(table: list[dict], select_metric: str = SELECT_METRIC) -> list[dict]:
    """The columns that decide, with readable headers: the validation column of
    `select_metric` is marked "(decides)", test columns are named "test" or follow it; the
    selected row's model marked. A failed trial shows its status in place of its metrics."""
    out = []
    for record in table:
        row = {
            header: record.get(column, math.nan)
            for column, header in decision_columns(select_metric).items()
        }
        if record.get("selected"):
            row["model"] = f"{row['model']}{SELECTED_MARK}"
        if record.get("status", "ok") != "ok":
            row["model"] = f"{row['model']} ({record['status'][:60]})"
        seconds = row["seconds"]
        if isinstance(seconds, float) and math.isfinite(seconds):
            row["seconds"] = f"{seconds:.1f}"  # tenths are enough to compare costs
        out.append(row)
    return drop_empty_columns(out)


def decision_markdown(
    rows: Sequence[ResultRow], baseline: str = BASELINE, select_metric: str = SELECT_METRIC
) -> str:
    """results.md's first table as Markdown (also what `hashtag tune` prints)."""
    return to_markdown(decision_table(results_table(rows, baseline, select_metric), select_metric))


def to_markdown(table: list[dict]) -> str:
    if not table:
        return "(no results)\n"
    columns = list(table[0])
    lines = [
        "| " + " | ".join(columns) + " |",
        "|"
        + "|".join("---" if c in ("model", "status", "selected") else "---:" for c in columns)
        + "|",
    ]
    for record in table:
        cells = [
            f"{record[c]:g}"
            if c in ("learning_rate", "learning rate") and isinstance(record[c], float)
            else _format(record[c])
            for c in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _format(value, csv: bool = False) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "" if csv else "-"
        return repr(value) if csv else f"{value:.4f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def outlined_trial(rows: Sequence[ResultRow], metric: str = SELECT_METRIC):
    """(the trial the heatmap outlines, whether it is the exported model): the exported
    (`selected`) trial; when a reference or a blend was exported instead, the best trial on
    validation `metric` (the one blends use); None without a finished trial."""
    trials = [r for r in rows if r.is_trial and r.status == "ok"]
    for row in trials:
        if row.selected:
            return row, True
    scored = [r for r in trials if math.isfinite(r.val.get(metric, math.nan))]
    if not scored:
        return None, False
    return max(scored, key=lambda r: r.val[metric]), False


def plot_heatmap(rows: Sequence[ResultRow], uri: str, metric: str = SELECT_METRIC) -> None:
    """`metric` (tune's --select-metric) over batch size x learning rate, validation and test
    side by side. The exported trial is outlined in red; when the export is a reference or a
    blend, the best trial on validation is outlined dashed and the title names the export.
    """
    plt = _pyplot()
    trials = [r for r in rows if r.is_trial]
    if not trials:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no grid trials", ha="center", va="center")
        _save_figure(fig, uri)
        return
    batch_sizes = sorted({r.batch_size for r in trials})
    learning_rates = sorted({r.learning_rate for r in trials}, reverse=True)
    grids = {
        split: np.full((len(batch_sizes), len(learning_rates)), np.nan) for split in ("val", "test")
    }
    for r in trials:
        i, j = batch_sizes.index(r.batch_size), learning_rates.index(r.learning_rate)
        grids["val"][i, j] = r.val.get(metric, np.nan)
        grids["test"][i, j] = r.test.get(metric, np.nan)
    outlined, exported = outlined_trial(rows, metric)
    best = None
    if outlined is not None:
        best = (
            batch_sizes.index(outlined.batch_size),
            learning_rates.index(outlined.learning_rate),
        )

    fig, axes = plt.subplots(
        1,
        2,
        figsize=(4 + 2.2 * max(len(learning_rates), 1), 1.5 + 1.1 * max(len(batch_sizes), 1)),
        squeeze=False,
    )
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    for ax, (split, grid) in zip(axes[0], grids.items(), strict=True):
        image = ax.imshow(
            grid, cmap="viridis", vmin=vmin, vmax=max(vmax, vmin + 1e-9), aspect="auto"
        )
        ax.set_xticks(range(len(learning_rates)), [f"{lr:g}" for lr in learning_rates])
        ax.set_yticks(range(len(batch_sizes)), [str(bs) for bs in batch_sizes])
        ax.set_xlabel("learning rate")
        ax.set_ylabel("batch size")
        ax.set_title(f"{'validation' if split == 'val' else 'test'} {metric}")
        middle = (vmin + vmax) / 2
        for (i, j), value in np.ndenumerate(grid):
            text = "failed" if np.isnan(value) else f"{value:.3f}"
            colour = "black" if not np.isnan(value) and value > middle else "white"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=9)
        if best is not None:
            ax.add_patch(
                plt.Rectangle(
                    (best[1] - 0.5, best[0] - 0.5),
                    1,
                    1,
                    fill=False,
                    edgecolor="red",
                    linewidth=2,
                    linestyle="-" if exported else "--",
                )
            )
        fig.colorbar(image, ax=ax, fraction=0.046)
    selected = next((r for r in rows if r.selected), None)
    if exported or selected is None:
        note = "red: the exported trial" if exported else "red: best on validation"
    else:
        note = f"exported: {selected.label}; dashed: the best trial on validation"
    fig.suptitle(f"{trials[0].model}: {metric} ({note})", fontsize=10)
    fig.tight_layout()
    _save_figure(fig, uri)


def plot_curves(rows: Sequence[ResultRow], uri: str) -> None:
    """Per-epoch curves of every trial: F1-like series on the left, losses on the right."""
    plt = _pyplot()
    trials = [r for r in rows if r.is_trial and r.history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = plt.get_cmap("tab10")
    for n, row in enumerate(trials):
        colour = colours(n % 10)
        for name, values in sorted(row.history.items()):
            epochs = np.arange(1, len(values) + 1)
            style = "--" if name.startswith("val_") and "loss" in name else "-"
            if name in CURVE_LOSS:
                # One legend entry per trial: the dashed validation loss shares its colour.
                label = None if name.startswith("val_") else row.label
                right.plot(epochs, values, style, color=colour, label=label)
            elif name in CURVE_F1:
                left.plot(
                    epochs, values, "-", color=colour, marker=".", label=f"{row.label} {name}"
                )
    has_val_loss = any("val_loss" in row.history for row in trials)
    left.set_title("validation F1 per epoch")
    right.set_title("loss per epoch" + (" (dashed: validation)" if has_val_loss else " (training)"))
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=7, loc="best")
        else:
            ax.text(
                0.5, 0.5, "no per-epoch history", ha="center", va="center", transform=ax.transAxes
            )
    fig.tight_layout()
    _save_figure(fig, uri)


def write_report(
    rows: Sequence[ResultRow],
    out: str,
    baseline: str = BASELINE,
    select_metric: str = SELECT_METRIC,
) -> dict[str, str]:
    """Write results.csv, results.md, heatmap.png and curves.png under `out`; returns their
    URIs. `select_metric`: the validation metric the export was chosen on (the decision
    table's "(decides)" column, the heatmap's metric)."""
    table = results_table(rows, baseline, select_metric)
    paths = {
        name: storage.join(out, name)
        for name in ("results.csv", "results.md", "heatmap.png", "curves.png")
    }
    storage.write_text(paths["results.csv"], to_csv(table))
    lines = "\n".join(trial_line(r) for r in rows)
    storage.write_text(
        paths["results.md"],
        f"# Results\n\nThe model marked (selected) is exported: the best on validation "
        f"{select_metric}, the column marked (decides); test columns are reported, never used "
        f"to choose.\n\n{to_markdown(decision_table(table, select_metric))}\n"
        f"## Every metric\n\nTest split unless named val_; lift = over {baseline}.\n\n"
        f"{to_markdown(drop_empty_columns(table))}\n```\n{lines}\n```\n",
    )
    plot_heatmap(rows, paths["heatmap.png"], select_metric)
    plot_curves(rows, paths["curves.png"])
    return paths


def _pyplot():
    # Agg: no display on workers and servers; set before pyplot is first imported.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, uri: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    _pyplot().close(fig)
    storage.write_bytes(uri, buffer.getvalue())
