"""`hashtag SUBCOMMAND`: the flags of every subcommand come from its stage's config dataclass.

A field `batch_sizes: tuple[int, ...]` becomes `--batch-sizes 16,64,256`; a bool becomes
`--flag` / `--no-flag`; `--config FILE.yaml` sets any field (flags override the file). The jobs/
entrypoints use the same parser, so `ray job submit -- python jobs/X.py` takes the same flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import logging
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

# subcommand -> (module, config class, run function, one-line help)
STAGES: dict[str, tuple[str, str, str, str]] = {
    "demo": (
        "hashtag.demo",
        "DemoConfig",
        "run",
        "write synthetic demo posts as an instaloader folder",
    ),
    "scrape": (
        "hashtag.scrape",
        "ScrapeConfig",
        "run",
        "ingest and embed posts into shards (Ray tasks)",
    ),
    "merge": (
        "hashtag.merge",
        "MergeConfig",
        "run",
        "merge shards into one dataset with contiguous ids",
    ),
    "tune": (
        "hashtag.tune",
        "TuneConfig",
        "run",
        "train the batch size x learning rate grid on Ray Tune",
    ),
    "recommend": ("hashtag.recommend", "RecommendConfig", "run", "recommend hashtags for images"),
    "evaluate": (
        "hashtag.recommend",
        "EvaluateConfig",
        "evaluate",
        "score a model on a dataset's test split",
    ),
    "pipeline": (
        "hashtag.pipeline",
        "PipelineConfig",
        "run",
        "scrape -> merge -> tune -> export, end to end",
    ),
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap(annotation: Any) -> Any:
    """`str | None` -> str."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation


def _converter(annotation: Any) -> Callable[[str], Any]:
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is tuple:
        item = _converter(typing.get_args(annotation)[0])
        return lambda text: tuple(item(part) for part in str(text).split(",") if part.strip())
    if annotation in (int, float, str):
        return annotation
    return str


def _coerce(annotation: Any, value: Any) -> Any:
    """A value from YAML into the field's type (lists into tuples, "1e-3" into floats)."""
    annotation = _unwrap(annotation)
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        values = value if isinstance(value, (list, tuple)) else str(value).split(",")
        return tuple(_coerce(item, v) for v in values)
    if annotation is bool:
        return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")
    if annotation in (int, float, str) and value is not None:
        return annotation(value)
    return value


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    hints = typing.get_type_hints(config_cls)
    for f in dataclasses.fields(config_cls):
        annotation = hints[f.name]
        help_text = f.metadata.get("help", "").replace("%", "%%")
        has_default = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        if has_default:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {shown})"
        else:
            help_text += " (required)"
        if f.metadata.get("positional"):
            parser.add_argument(
                f.name,
                nargs="*",
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=f.metadata.get("metavar", f.name.upper()),
            )
        elif f.metadata.get("repeatable"):  # --embedder A --embedder B
            parser.add_argument(
                _flag(f.name),
                action="append",
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=f.name.upper(),
            )
        elif _unwrap(annotation) is bool:
            parser.add_argument(
                _flag(f.name),
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                _flag(f.name),
                type=_converter(annotation),
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=f.name.upper(),
            )


def config_from_args(
    config_cls: type, args: argparse.Namespace, parser: argparse.ArgumentParser
) -> Any:
    """Build the config: values from --config FILE, then the flags given on the command line."""
    hints = typing.get_type_hints(config_cls)
    names = {f.name for f in dataclasses.fields(config_cls)}
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        import yaml

        from hashtag import storage

        loaded = yaml.safe_load(storage.read_text(args.config)) or {}
        if not isinstance(loaded, dict):
            parser.error(f"{args.config}: expected a mapping of option: value")
        for key, value in loaded.items():
            name = key.replace("-", "_")
            if name not in names:
                parser.error(
                    f"{args.config}: unknown option {key!r}; known: {', '.join(sorted(names))}"
                )
            values[name] = _coerce(hints[name], value)
    for name in names:
        if name in args:
            value = getattr(args, name)
            values[name] = tuple(value) if isinstance(value, list) else value
    missing = [
        _flag(f.name)
        for f in dataclasses.fields(config_cls)
        if f.name not in values
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        parser.error(f"missing {', '.join(missing)} (give it as a flag or in --config FILE)")
    try:
        return config_cls(**values)
    except (ValueError, TypeError) as error:
        parser.error(str(error))


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file of option: value (flags override it)"
    )
    parser.add_argument(
        "--s3-endpoint", metavar="URL", help="S3 API endpoint (default: $AWS_ENDPOINT_URL or AWS)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _setup(args: argparse.Namespace) -> None:
    from hashtag import storage

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    storage.set_s3_endpoint(args.s3_endpoint)


def _exit_code(result: Any) -> int:
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    if isinstance(result, dict):
        return 1 if result.get("failed_shards") or result.get("failed") else 0
    return 0


def _load_stage(name: str) -> tuple[type, Callable]:
    module_name, config_name, run_name, _ = STAGES[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, run_name)


def run_stage(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse `argv` for one stage and run it: what jobs/*.py call."""
    config_cls, run = _load_stage(name)
    parser = argparse.ArgumentParser(prog=prog, description=STAGES[name][3])
    _add_common(parser)
    add_config_arguments(parser, config_cls)
    args = parser.parse_args(argv)
    _setup(args)
    config = config_from_args(config_cls, args, parser)
    return _exit_code(run(config))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="hashtag", description="Recommend hashtags for images: scrape, merge, tune, recommend."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_text) in STAGES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        parser.parse_args(argv or ["--help"])
        return 2
    return run_stage(argv[0], argv[1:], prog=f"hashtag {argv[0]}")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, ensure_ascii=False, default=str))


if __name__ == "__main__":
    sys.exit(main())
