"""The CLI: every subcommand has --help; flags come from the stage configs; --config YAML."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hashtag import cli
from hashtag.errors import UserError
from hashtag.scrape import ScrapeConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", sorted(cli.STAGES))
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--config" in capsys.readouterr().out


def _parse(argv: list[str]) -> ScrapeConfig:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    cli.add_config_arguments(parser, ScrapeConfig)
    return cli.config_from_args(ScrapeConfig, parser.parse_args(argv))


def test_yaml_config_and_flags_override_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "source: posts.jsonl\nout: s3://bucket/run\nshard-size: 64\ntrust_pickle: true\n"
    )
    config = _parse(["--config", str(path), "--shard-size", "128"])
    assert (config.source, config.out, config.shard_size) == ("posts.jsonl", "s3://bucket/run", 128)
    assert config.trust_pickle is True


def test_missing_and_unknown_options_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="missing --source"):
        _parse(["--out", "x"])
    path = tmp_path / "bad.yaml"
    path.write_text("sauce: x\n")
    with pytest.raises(UserError, match="unknown option 'sauce'"):
        _parse(["--config", str(path)])
    with pytest.raises(UserError, match="--shard-size must be at least 1"):
        _parse(["--source", "x", "--out", "y", "--shard-size", "0"])


def test_fetch_settings_are_one_embedded_section_under_the_same_flags(tmp_path):
    """FetchConfig is declared once; scrape, recommend and serve embed it and offer its fields
    under the flag names users know, with their stage's default, and record them flat."""
    from hashtag import options
    from hashtag.fetch import FetchConfig
    from hashtag.recommend import RecommendConfig
    from hashtag.serve import ServeConfig

    flags = ["--timeout-s", "1", "--fetch-retries", "0", "--fetch-deadline-s", "2"]
    config = _parse(["--source", "x", "--out", "y", *flags, "--max-image-bytes", "10"])
    assert config.fetch == FetchConfig(timeout_s=1, retries=0, fetch_deadline_s=2, max_bytes=10)
    path = tmp_path / "job.yaml"
    path.write_text("source: x\nout: y\nallow_private_addresses: true\nfetch-retries: 1\n")
    config = _parse(["--config", str(path)])
    assert config.fetch == FetchConfig(allow_private=True, retries=1)
    summary = options.flatten(config)  # what scrape.json records: the keys it always had
    assert {k: summary[k] for k in ("allow_private_addresses", "fetch_retries")} == {
        "allow_private_addresses": True,
        "fetch_retries": 1,
    }
    assert options.build(ScrapeConfig, summary) == config
    with pytest.raises(UserError, match="--fetch-deadline-s .* must be > 0"):
        _parse(["--source", "x", "--out", "y", "--fetch-deadline-s", "0"])
    defaults = {o.name: o.default for o in options.options(ServeConfig)}
    assert defaults["fetch_deadline_s"] == 5.0 and "fetch_retries" not in defaults
    served = options.build(ServeConfig, {"model": "m", "fetch_deadline_s": 2.0})
    assert (served.fetch.timeout_s, served.fetch.attempt_deadline_s) == (2.0, 2.0)
    assert served.fetch.retries == 1 and served.fetch.max_bytes == served.max_body_bytes
    assert [o.name for o in options.options(RecommendConfig) if o.section] == ["fetch_deadline_s"]


def test_console_script_and_jobs_entrypoints_run():
    for argv in (["-m", "hashtag.cli", "scrape", "--help"], ["jobs/pipeline.py", "--help"]):
        done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout


# --- errors, label-only completion, batch recommend, the pipeline config: through the CLI ------


def hashtag(*argv: str, cwd: Path = REPO, script: str | None = None, stdin: str | None = None):
    """Run `hashtag ARGV` (or `python SCRIPT ARGV`) in a fresh interpreter."""
    command = [sys.executable, script] if script else [sys.executable, "-m", "hashtag.cli"]
    return subprocess.run(
        [*command, *argv], cwd=cwd, capture_output=True, text=True, timeout=120, input=stdin
    )


def assert_one_line_error(done, stage: str, code: int = 2, match: str = "") -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == code, done.stderr
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{stage}: error: "), lines[0]
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two datasets of different runs and a model exported from the first (no Ray)."""
    from test_tune import write_dataset

    from hashtag import models, selection
    from hashtag.report import ResultRow

    root = tmp_path_factory.mktemp("runs")
    first = write_dataset(str(root / "one"), tags=8)
    write_dataset(str(root / "two"), tags=6, seed=1)
    X, Y = first.part("train")
    knn = models.create("knn").fit(X, Y, *first.part("val"), vocab=first.vocab)
    model = selection.export_model(
        first, knn, ResultRow(model="knn"), out=str(root / "tune"),
        dataset_uri=str(root / "one"), loss="sigmoid",
    )  # fmt: skip
    return root, model


def test_ordinary_mistakes_are_one_line_exit_2(tmp_path, two_runs):
    root, model = two_runs
    (tmp_path / "empty").mkdir()
    (tmp_path / "posts.jsonl").write_text("\n")
    cases = [
        (["merge", "--shards", "/missing", "--out", str(tmp_path / "d")], "run `hashtag scrape`"),
        (["tune", "--data", "/missing", "--out", str(tmp_path / "t")], "`hashtag merge`"),
        (["recommend", "--model", "/missing", "--tags", "a"], "give --model the folder"),
        (["scrape", "--source", "/missing", "--out", str(tmp_path / "s")], "no source at"),
        (
            ["scrape", "--source", str(tmp_path / "empty"), "--out", str(tmp_path / "s")],
            "instaloader",
        ),
        (
            ["scrape", "--source", str(tmp_path / "posts.jsonl"), "--out", str(tmp_path / "s")],
            "rows",
        ),
        (
            ["evaluate", "--model", model, "--data", str(root / "two")],
            "different hashtag vocabulary",
        ),
        (["tune", "--data", "x", "--out", "y", "--epochs", "0"], "--epochs must be at least 1"),
        (["tune", "--data", "x", "--out", "y", "--epochs", "many"], "invalid int value"),
        (["tune", "--out", "y"], "missing --data"),
        (["recommend", "--model", model, "--manifest", str(tmp_path / "nope.jsonl")], "no such"),
    ]
    for argv, message in cases:
        assert_one_line_error(hashtag(*argv), f"hashtag {argv[0]}", 2, message)
    assert not (tmp_path / "s").exists()  # refused before any work
    # The jobs/ entrypoints say the same.
    done = hashtag("--shards", "/missing", "--out", "x", script="jobs/merge.py")
    assert_one_line_error(done, "hashtag merge", 2, "no finished shards")
    done = hashtag("--data", "x", "--out", "y", "--epochs", "x", script="jobs/tune.py")
    assert_one_line_error(done, "hashtag tune", 2, "(see jobs/tune.py --help)")


def test_verbose_adds_the_traceback_and_runtime_failures_exit_1(capsys):
    done = hashtag("tune", "--data", "/missing", "--out", "/tmp/never", "-v")
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("hashtag tune: error: no dataset")
    assert cli.report_error("hashtag x", RuntimeError("disk on fire\nmore"), False) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "hashtag x: error: RuntimeError: disk on fire; -v shows the traceback"


def markdown_rows(lines: list[str]) -> dict[str, dict[str, str]]:
    """A printed Markdown table: model -> {header: cell}."""
    rows = [
        [c.strip() for c in line.strip().strip("|").split("|")]
        for line in lines
        if line.startswith("| ")
    ]
    header = rows[0]
    return {row[0]: dict(zip(header, row, strict=True)) for row in rows[1:]}


def write_label_only(uri: str):
    from test_tune import write_dataset

    from hashtag.ingest import LABEL_ONLY_SPEC

    return write_dataset(uri, posts=400, dim=0, tags=12, embedder=LABEL_ONLY_SPEC.to_json())


def test_label_only_tune_exports_completion_and_batch_recommend_streams(tmp_path):
    data, out = str(tmp_path / "data"), tmp_path / "tune"
    dataset = write_label_only(data)
    done = hashtag("tune", "--data", data, "--out", str(out))
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    printed = done.stdout.splitlines()
    assert "completion model" in done.stdout and "--tags" in done.stdout
    assert len(printed) <= 10
    table = markdown_rows(printed)
    # The decision rule: plain and weighted co-occurrence compete on validation F1@5 (the
    # column marked "decides"); the better is marked and exported (plain on a tie).
    val = {
        name.removesuffix(" (selected)"): float(row["val F1@5 (decides)"])
        for name, row in table.items()
    }
    winner = "cooccurrence" if val["cooccurrence"] >= val["completion"] else "completion"
    loser = {"cooccurrence": "completion", "completion": "cooccurrence"}[winner]
    assert {"popularity", loser, f"{winner} (selected)"} == set(table)
    # results.md: the deciding columns first, every other metric in a second table.
    report = (out / "results.md").read_text().split("## Every metric")
    first = markdown_rows(report[0].splitlines())[f"{winner} (selected)"]
    assert list(first)[0] == "model" and {"test F1@5", "P@5", "R@5", "mAP", "lift F1@5"} <= set(
        first
    )
    assert len(first) <= 10 and "hit@10" in report[1] and "p@1" in report[1]
    model = str(out / "model")
    # evaluate scores the completion model the same way, on the same held-out tags.
    done = hashtag("evaluate", "--model", model, "--data", data)
    scored = markdown_rows(done.stdout.splitlines())
    assert done.returncode == 0 and set(scored) == {"popularity", "cooccurrence", "completion"}
    # evaluate's "completion" row is the exported model: the winner's test figures.
    assert scored["completion"]["test F1@5"] == table[f"{winner} (selected)"]["test F1@5"]

    # Batch mode: one output line per post, in order, carrying the id and the image.
    rows = [
        {"id": "a", "tags": [dataset.vocab[0]]},
        {"tags": f"{dataset.vocab[1]},{dataset.vocab[2]}"},
        {"id": "pic", "image": "photo.jpg", "tags": []},
    ] * 50
    manifest = tmp_path / "posts.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows) + "not json\n")
    done = hashtag("recommend", "--model", model, "--manifest", str(manifest), "--json")
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 1 and len(results) == len(rows) + 1  # the bad line is a line too
    assert results[0]["id"] == "a" and len(results[0]["hashtags"]) == 5
    assert dataset.vocab[0] not in {h["tag"] for h in results[0]["hashtags"]}
    assert results[1]["id"] == "2" and results[1]["given"] == dataset.vocab[1:3]
    assert (
        results[2]["image"] == str(tmp_path / "photo.jpg") and "labels only" in results[2]["error"]
    )
    assert results[-1]["id"] == f"line {len(rows) + 1}" and "error" in results[-1]
    done = hashtag("recommend", "--model", model, "--tags", dataset.vocab[0])
    assert done.returncode == 0 and done.stdout.count("#") == 6, done.stdout


def test_batch_recommend_answers_before_the_manifest_ends(tmp_path):
    """Streaming: the first batch is answered while the manifest (stdin here) is still open."""
    from hashtag.recommend import BATCH

    data = str(tmp_path / "data")
    dataset = write_label_only(data)
    assert hashtag("tune", "--data", data, "--out", str(tmp_path / "tune")).returncode == 0
    command = [sys.executable, "-m", "hashtag.cli", "recommend", "--manifest", "-", "--json"]
    reader = subprocess.Popen(
        [*command, "--model", str(tmp_path / "tune" / "model")],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for n in range(BATCH):
            reader.stdin.write(json.dumps({"id": n, "tags": [dataset.vocab[n % 5]]}) + "\n")
        reader.stdin.flush()
        first = [json.loads(reader.stdout.readline()) for _ in range(BATCH)]
        assert [r["id"] for r in first] == [str(n) for n in range(BATCH)]
        reader.stdin.write(json.dumps({"id": "last", "tags": []}) + "\n")
        reader.stdin.close()
        rest = reader.stdout.read().splitlines()
        assert reader.wait(timeout=60) == 0 and json.loads(rest[-1])["id"] == "last"
    finally:
        reader.kill()


def test_pipeline_config_sections_flags_and_yaml(tmp_path):
    from hashtag.pipeline import PipelineConfig

    path = tmp_path / "job.yaml"
    path.write_text(
        "source: posts.jsonl\nout: s3://bucket/run\nepochs: 3\n"
        "scrape: {max-retries: 5, fetch-retries: 1}\nmerge: {val-fraction: 0.2, seed: abc}\n"
        "tune: {batch-sizes: [16, 32], seed: 7}\nrecommend: {k: 3}\n"
    )
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    cli.add_config_arguments(parser, PipelineConfig)
    args = parser.parse_args(["--config", str(path), "--tune.epochs", "4", "--max-in-flight", "2"])
    config = cli.config_from_args(PipelineConfig, args)
    assert (config.scrape.max_retries, config.scrape.fetch.retries) == (5, 1)
    assert config.scrape.max_in_flight == 2 and config.scrape.out == "s3://bucket/run"
    assert config.scrape.source == "posts.jsonl" and config.merge.shards == "s3://bucket/run"
    assert (config.merge.val_fraction, config.merge.seed) == (0.2, "abc")
    assert (config.tune.batch_sizes, config.tune.seed, config.tune.epochs) == ((16, 32), 7, 4)
    assert config.tune.data == "s3://bucket/run/dataset" and config.recommend.k == 3
    # Every stage option is a flag of `hashtag pipeline` (derived ones excepted).
    help_text = hashtag("pipeline", "--help").stdout
    for flag in ("--scrape.max-retries", "--merge.val-fraction", "--tune.max-failures"):
        assert flag in help_text
    assert "--merge.shards" not in help_text and "--tune.data" not in help_text
    # Validated in full before any work: nothing is written.
    for argv, message in [
        (["--demo", "--tune.epochs", "0"], "tune: --epochs must be at least 1"),
        (["--demo", "--scrape.shard-size", "0"], "scrape: --shard-size must be at least 1"),
        (["--demo", "--source", "x"], "drop --source"),
        (["--demo", "--seed", "1"], "unrecognized arguments: --seed"),  # merge and tune have one
    ]:
        done = hashtag("pipeline", "--out", str(tmp_path / "run"), *argv)
        assert_one_line_error(done, "hashtag pipeline", 2, message)
    path.write_text("source: x\nout: y\nmerge: {shards: elsewhere}\n")
    done = hashtag("pipeline", "--config", str(path))
    assert_one_line_error(done, "hashtag pipeline", 2, "shards is set by the pipeline")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pipeline_is_quiet_by_default(tmp_path):
    """A whole small demo run prints progress bars, one summary per stage and the results:
    no Tune tables or boxes, no tensorboardX name warnings, no checkpoint or Ray notices."""
    out = tmp_path / "run"
    small = ["--demo-posts", "40", "--shard-size", "20", "--epochs", "2"]
    grid = ["--batch-sizes", "16", "--learning-rates", "1e-2", "--examples", "1"]
    argv = ["pipeline", "--demo", "--out", str(out), *small, *grid]
    # Bytes, not text: text mode would turn a progress bar's \r into line ends.
    done = subprocess.run(
        [sys.executable, "-m", "hashtag.cli", *argv], cwd=REPO, capture_output=True
    )
    assert done.returncode == 0, done.stderr
    text = (done.stdout + done.stderr).decode()
    # What a terminal keeps: lines end at \n, a progress bar redraws itself after \r.
    lines = [line.rsplit("\r", 1)[-1] for line in text.strip().split("\n")]
    for noise in ("is illegal", "Configuration for experiment", "Checkpoint", "Traceback"):
        assert noise not in text, noise
    assert "Token authentication" not in text and "Started a local Ray" not in text
    # Besides the results table (a row per candidate model): bars (merge's near-duplicate step
    # has its own), summaries, the near-duplicate line under the table, recommendations.
    assert len([line for line in lines if not line.startswith("|")]) <= 20, "\n".join(lines)
    assert any("(selected)" in line for line in lines)
    assert any(line.startswith("pipeline done") for line in lines)
