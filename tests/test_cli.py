"""The CLI: every subcommand has --help; flags come from the stage configs; --config YAML."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from hashtag import cli
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
    return cli.config_from_args(ScrapeConfig, parser.parse_args(argv), parser)


def test_yaml_config_and_flags_override_it(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        "source: posts.jsonl\nout: s3://bucket/run\nshard-size: 64\ntrust_pickle: true\n"
    )
    config = _parse(["--config", str(path), "--shard-size", "128"])
    assert (config.source, config.out, config.shard_size) == ("posts.jsonl", "s3://bucket/run", 128)
    assert config.trust_pickle is True


def test_missing_and_unknown_options_are_clear_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        _parse(["--out", "x"])
    assert "missing --source" in capsys.readouterr().err
    path = tmp_path / "bad.yaml"
    path.write_text("sauce: x\n")
    with pytest.raises(SystemExit):
        _parse(["--config", str(path)])
    assert "unknown option 'sauce'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["--source", "x", "--out", "y", "--shard-size", "0"])
    assert "--shard-size must be at least 1" in capsys.readouterr().err


def test_console_script_and_jobs_entrypoints_run():
    for argv in (["-m", "hashtag.cli", "scrape", "--help"], ["jobs/pipeline.py", "--help"]):
        done = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert "usage" in done.stdout
