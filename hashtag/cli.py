"""`hashtag SUBCOMMAND`: the flags of every subcommand come from its stage's config dataclass.

A field `batch_sizes: tuple[int, ...]` becomes `--batch-sizes 16,64,256`; a bool becomes
`--flag` / `--no-flag`; `--config FILE.yaml` sets any field (flags override the file). The jobs/
entrypoints use the same parser, so `ray job submit -- python jobs/X.py` takes the same flags.

Errors are one line on stderr, `hashtag STAGE: error: MESSAGE`: a user mistake (UserError, a bad
option, a missing input) exits 2, any other failure exits 1; `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import logging
import sys
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from hashtag import options
from hashtag.errors import UserError

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
    "serve": (
        "hashtag.serve",
        "ServeConfig",
        "run",
        "serve suggestions over HTTP (Ray Serve): POST /v1/recommend",
    ),
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


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block): `LABEL: error: MESSAGE (see PROG --help)`,
    LABEL being `hashtag STAGE` whichever script runs the stage."""

    label = ""

    def error(self, message: str) -> typing.NoReturn:
        label = self.label or self.prog
        self.exit(2, f"{label}: error: {message} (see {self.prog} --help)\n")


def _sections(config_cls: type) -> dict[str, dataclasses.Field]:
    """Fields that hold a whole stage config (PipelineConfig's scrape, merge, tune...)."""
    return {f.name: f for f in dataclasses.fields(config_cls) if f.metadata.get("section")}


def add_config_arguments(parser: argparse.ArgumentParser, config_cls: type) -> None:
    """One flag per option (options.py: a field, or a field of an embedded config such as
    FetchConfig). A section field (a stage config inside PipelineConfig) adds its stage's flags
    as `--SECTION.OPTION` (`--scrape.max-retries 5`; derived fields excepted), and also as plain
    `--OPTION` when no other section nor the config itself has that option."""
    _add_options(parser, config_cls, prefix="")
    unique = _unique_section_options(config_cls)
    for name, f in _sections(config_cls).items():
        group = parser.add_argument_group(f"{name} options", f.metadata.get("help"))
        _add_options(group, f.metadata["section"], name, f.metadata["derived"], unique)


def _unique_section_options(config_cls: type) -> dict[str, str]:
    """Option name -> its section, for the options only one section has (and not the config)."""
    owners: dict[str, list[str]] = {o.name: ["(own)"] for o in options.options(config_cls)}
    for name, f in _sections(config_cls).items():
        for option in options.options(f.metadata["section"], f.metadata["derived"]):
            owners.setdefault(option.name, []).append(name)
    return {option: names[0] for option, names in owners.items() if len(names) == 1}


def _add_options(
    parser, config_cls: type, prefix: str, exclude: Sequence[str] = (), unique=None
) -> None:
    for option in options.options(config_cls, exclude):
        name, metadata, annotation = option.name, option.field.metadata, option.annotation
        dest = f"{prefix}.{name}" if prefix else name
        flags = [_flag(dest)]
        if prefix and (unique or {}).get(name) == prefix:
            flags.append(_flag(name))
        help_text = metadata.get("help", "").replace("%", "%%")
        if option.required:
            help_text += " (required)"
        else:
            default = option.default
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            help_text += f" (default: {shown})"
        if metadata.get("positional"):
            parser.add_argument(
                dest,
                nargs="*",
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=metadata.get("metavar", name.upper()),
            )
        elif metadata.get("repeatable"):  # --embedder A --embedder B
            parser.add_argument(
                *flags,
                dest=dest,
                action="append",
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=name.upper(),
            )
        elif _unwrap(annotation) is bool:
            parser.add_argument(
                *flags,
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                *flags,
                dest=dest,
                type=_converter(annotation),
                default=argparse.SUPPRESS,
                help=help_text,
                metavar=name.upper(),
            )


def _values(config_cls, loaded, args, prefix, exclude=(), where="") -> dict[str, Any]:
    """Option values of `config_cls` from a YAML mapping, then the flags given (flags win)."""
    known = {o.name: o for o in options.options(config_cls, exclude)}
    values: dict[str, Any] = {}
    for key, value in (loaded or {}).items():
        name = str(key).replace("-", "_")
        if name not in known:
            names = ", ".join(sorted(n.replace("_", "-") for n in known))
            derived = f" ({key} is set by the pipeline)" if name in exclude else ""
            raise UserError(f"{where}unknown option {key!r}{derived}; known: {names}")
        try:
            values[name] = _coerce(known[name].annotation, value)
        except (TypeError, ValueError) as error:
            raise UserError(f"{where}{key}: {error}") from None
    for name in known:
        dest = f"{prefix}.{name}" if prefix else name
        if dest in args:
            value = getattr(args, dest)
            values[name] = tuple(value) if isinstance(value, list) else value
    return values


def config_from_args(config_cls: type, args: argparse.Namespace) -> Any:
    """Build and validate the config: values from --config FILE, then the flags given. Raises
    UserError (one line) for an unknown, missing or invalid option."""
    loaded: dict = {}
    if getattr(args, "config", None):
        import yaml

        from hashtag import storage

        try:
            loaded = yaml.safe_load(storage.read_text(args.config)) or {}
        except FileNotFoundError:
            raise UserError(f"--config {args.config}: no such file") from None
        except yaml.YAMLError as error:
            raise UserError(f"--config {args.config}: not valid YAML ({error})") from None
        if not isinstance(loaded, dict):
            raise UserError(f"{args.config}: expected a mapping of option: value")
    sections = _sections(config_cls)
    where = f"{args.config}: " if getattr(args, "config", None) else ""
    for name in sections:
        if not isinstance(loaded.get(name) or {}, dict):
            raise UserError(f"{where}{name}: expected a mapping of option: value")
    routed: dict[str, dict] = {name: dict(loaded.get(name) or {}) for name in sections}
    top = {}
    unique = _unique_section_options(config_cls)
    for key, value in loaded.items():
        option = str(key).replace("-", "_")
        if key in sections:
            continue
        if option in unique and unique[option] in sections:  # a plain key only one stage has
            routed[unique[option]].setdefault(key, value)
        else:
            top[key] = value
    values = _values(config_cls, top, args, "", where=where)
    for name, f in sections.items():
        section = routed[name]
        values[name] = _values(
            f.metadata["section"], section, args, name, f.metadata["derived"], f"{where}{name}: "
        )
    missing = [
        _flag(o.name) for o in options.options(config_cls) if o.name not in values and o.required
    ]
    if missing:
        raise UserError(f"missing {', '.join(missing)} (give it as a flag or in --config FILE)")
    try:
        return options.build(config_cls, values)
    except (ValueError, TypeError) as error:
        raise UserError(str(error)) from None


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file of option: value (flags override it)"
    )
    parser.add_argument(
        "--s3-endpoint", metavar="URL", help="S3 API endpoint (default: $AWS_ENDPOINT_URL or AWS)"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging, tracebacks, Ray's own output"
    )


def _setup(verbose: bool) -> None:
    # Quiet by default: our one-line stage summaries and warnings; libraries only warn.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s",
        force=True,
    )
    logging.getLogger("hashtag").setLevel(logging.DEBUG if verbose else logging.INFO)


def exit_code(result: Any) -> int:
    """A stage's exit status: its result's `exit_code` (ScrapeResult...), an int, else 0."""
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return int(getattr(result, "exit_code", 0))


def as_user_error(error: BaseException) -> UserError | None:
    """The user mistake behind `error`, worded for the command line; None for a runtime failure."""
    error = getattr(error, "cause", None) or error  # a Ray task's error carries the original
    if isinstance(error, UserError):
        return error
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        if error.filename:
            return UserError(f"{error.filename}: no such file or folder; check the path or URI")
        return UserError(str(error))
    return None


def one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def report_error(prog: str, error: BaseException, verbose: bool) -> int:
    """Print `PROG: error: MESSAGE` (and the traceback with -v); 2 for a user mistake, else 1."""
    if verbose:
        traceback.print_exception(error)
    user = as_user_error(error)
    if user is not None:
        print(f"{prog}: error: {' '.join(str(user).split())}", file=sys.stderr)
        return 2
    hint = "" if verbose else "; -v shows the traceback"
    message = one_line(str(error)) or "(no message)"
    print(f"{prog}: error: {type(error).__name__}: {message}{hint}", file=sys.stderr)
    return 1


def _load_stage(name: str) -> tuple[type, Callable]:
    module_name, config_name, run_name, _ = STAGES[name]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, run_name)


def run_stage(name: str, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse `argv` for one stage and run it: what jobs/*.py call. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    label = f"hashtag {name}"  # errors say which stage, from the CLI and from jobs/*.py alike
    prog = prog or label
    verbose = "-v" in argv or "--verbose" in argv  # known before parsing: errors of parsing too
    _setup(verbose)
    try:
        config_cls, run = _load_stage(name)
        parser = _Parser(prog=prog, description=STAGES[name][3])
        parser.label = label
        _add_common(parser)
        add_config_arguments(parser, config_cls)
        args = parser.parse_args(argv)
        from hashtag import storage

        storage.set_s3_endpoint(args.s3_endpoint)
        config = config_from_args(config_cls, args)
        from tqdm.contrib.logging import logging_redirect_tqdm

        with logging_redirect_tqdm():  # log lines above the progress bars, not through them
            return exit_code(run(config))
    except KeyboardInterrupt:
        print(f"{label}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as error:
        return report_error(label, error, verbose)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _Parser(
        prog="hashtag", description="Recommend hashtags for images: scrape, merge, tune, recommend."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, _, _, help_text) in STAGES.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in STAGES:
        parser.parse_args(argv or ["--help"])
        return 2
    return run_stage(argv[0], argv[1:], prog=f"hashtag {argv[0]}")


if __name__ == "__main__":
    sys.exit(main())
