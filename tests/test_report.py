"""Report tables and plots from fake rows: no Ray, no training."""

from __future__ import annotations

import csv
import io
import math

import numpy as np
import pytest

from hashtag import report
from hashtag.report import ResultRow


def _metrics(f1: float) -> dict[str, float]:
    return {
        "f1": f1,
        "precision": f1 * 0.8,
        "recall": f1 * 1.2,
        "f1@5": f1 + 0.01,
        "p@10": 0.1,
        "p@3": 0.2,
        "map": 0.3,
    }


@pytest.fixture
def rows() -> list[ResultRow]:
    trials = [
        ResultRow(
            model="mlp",
            batch_size=bs,
            learning_rate=lr,
            test=_metrics(0.05 + 0.01 * n),
            val=_metrics(0.06 + 0.01 * n),
            seconds=1.5,
            epochs=3,
            history={
                "loss": [0.9, 0.7, 0.6],
                "val_loss": [1.0, 0.8, 0.75],
                "val_f1": [0.02, 0.05, 0.06],
            },
            trial_id=f"t{n}",
        )
        for n, (bs, lr) in enumerate((bs, lr) for bs in (16, 64) for lr in (1e-2, 1e-3))
    ]
    # One failed trial: no metrics, shown as such, not a crash.
    trials[-1] = ResultRow(model="mlp", batch_size=64, learning_rate=1e-3, status="error: boom")
    references = [
        ResultRow(model="popularity", test=_metrics(0.1), val=_metrics(0.1), seconds=0.01),
        ResultRow(model="knn", test=_metrics(0.12), val=_metrics(0.11), seconds=0.2),
    ]
    return trials + references


def test_table_has_every_metric_and_lift(rows):
    table = report.results_table(rows)
    assert [r["model"] for r in table][-2:] == ["knn", "popularity"] or table[-1]["model"] in (
        "knn",
        "popularity",
    )
    columns = list(table[0])
    for name in (
        "model",
        "batch_size",
        "learning_rate",
        "val_f1",
        "f1",
        "precision",
        "recall",
        "f1@5",
        "map",
        "lift_f1",
        "lift_f1@5",
        "seconds",
    ):
        assert name in columns
    # k sorted as a number: p@3 before p@10.
    assert columns.index("p@3") < columns.index("p@10")
    popularity = next(r for r in table if r["model"] == "popularity")
    assert popularity["lift_f1"] == pytest.approx(1.0)
    first = table[0]
    assert (first["batch_size"], first["learning_rate"]) == (16, 1e-2)
    assert first["lift_f1"] == pytest.approx(0.05 / 0.1)
    failed = next(r for r in table if r["status"] != "ok")
    assert math.isnan(failed["f1"])


def test_write_report_files(rows, tmp_path):
    paths = report.write_report(rows, str(tmp_path))
    with open(paths["results.csv"]) as f:
        records = list(csv.DictReader(f))
    assert len(records) == len(rows)
    assert {"f1", "precision", "recall", "lift_f1", "seconds", "val_f1"} <= set(records[0])
    markdown = (tmp_path / "results.md").read_text()
    assert "| model |" in markdown and "Model bs: 16 / lr: 0.01 / f1: 0.0500" in markdown
    for name in ("heatmap.png", "curves.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        image = matplotlib.image.imread(io.BytesIO(data), format="png")
        assert image.ndim == 3 and image.shape[0] > 100 and np.ptp(image) > 0


def test_trial_line_matches_the_original_format():
    row = ResultRow(
        model="mlp",
        batch_size=16,
        learning_rate=0.01,
        test={"f1": 0.079, "precision": 0.065, "recall": 0.099},
    )
    assert (
        report.trial_line(row) == "Model bs: 16 / lr: 0.01 / f1: 0.0790 / pre: 0.0650 / re: 0.0990"
    )


def test_plots_without_trials_or_history(tmp_path):
    only_reference = [ResultRow(model="popularity", test={"f1": 0.1})]
    paths = report.write_report(only_reference, str(tmp_path))
    assert (tmp_path / "heatmap.png").stat().st_size > 0
    assert "popularity" in (tmp_path / "results.md").read_text()
    assert paths["curves.png"].endswith("curves.png")


def test_decision_table_names_the_column_that_decides(rows):
    rows = [*rows[:-1], ResultRow(**{**rows[-1].__dict__, "selected": True})]
    default = report.decision_markdown(rows)
    assert "val F1@5 (decides)" in default and "test F1@5" in default
    assert "knn (selected)" in default and default.count("(selected)") == 1
    by_map = report.decision_markdown(rows, select_metric="map")
    assert "val mAP (decides)" in by_map and "val F1@5 (decides)" not in by_map
    header = by_map.splitlines()[0].split(" | ")
    assert header.index("val mAP (decides)") == header.index("val F1@5") + 1


def test_heatmap_outlines_the_exported_trial_not_the_best_val_f1(rows):
    # The best validation F1@5 trial is bs=64 lr=0.01; the exported (selected) one is bs=16
    # lr=0.001: the heatmap marks the exported one.
    trials = [r for r in rows if r.is_trial and r.status == "ok"]
    best_f1 = max(trials, key=lambda r: r.val["f1"])
    assert (best_f1.batch_size, best_f1.learning_rate) == (64, 1e-2)
    marked = [
        ResultRow(**{**r.__dict__, "selected": (r.batch_size, r.learning_rate) == (16, 1e-3)})
        for r in rows
    ]
    outlined, exported = report.outlined_trial(marked)
    assert exported and (outlined.batch_size, outlined.learning_rate) == (16, 1e-3)
    # A reference exported: the best trial on the selection metric is outlined (dashed).
    by_metric = [
        ResultRow(**{**r.__dict__, "val": {**r.val, "map": 1.0 if r.batch_size == 16 else 0.0}})
        for r in rows
    ]
    by_metric[-1] = ResultRow(**{**by_metric[-1].__dict__, "selected": True})
    outlined, exported = report.outlined_trial(by_metric, "map")
    assert not exported and outlined.batch_size == 16
