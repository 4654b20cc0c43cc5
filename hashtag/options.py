"""A stage config's options: the names a user sets as flags, in YAML, in `serve run` args, and
reads back in a stage's JSON summary.

An option is a field of the config, or a field of a config section the config embeds: a field
whose metadata `embed` names the fields of its config it offers (ScrapeConfig's `fetch:
FetchConfig` offers timeout_s, retries, ...). An embedded field keeps its type, help text and
validation where it is declared, and is offered under its metadata `option` name when it has one
(FetchConfig.retries is `fetch_retries`), with the embedding field's default (the value of the
default FetchConfig the stage embeds, so `hashtag serve --help` shows serve's own 5 s deadline).

    options(ScrapeConfig)                   # [Option("source"...), ..., Option("fetch_retries"...)]
    build(ScrapeConfig, {"source": "p.jsonl", "out": "o", "fetch_retries": 1})  # the config
    flatten(config)                          # {"source": ..., "fetch_retries": 1, ...}
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

MISSING = dataclasses.MISSING


@dataclass(frozen=True)
class Option:
    name: str  # --name-with-dashes on the command line, the key in YAML and summaries
    field: dataclasses.Field  # where it is declared: its help text and metadata
    annotation: Any  # its type, resolved
    default: Any  # MISSING when the option is required
    section: str = ""  # the embedding field ("fetch"); "" for the config's own field

    @property
    def required(self) -> bool:
        return self.default is MISSING


def _default(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def options(config_cls: type, exclude: typing.Collection[str] = ()) -> list[Option]:
    """The options of `config_cls`, in field order, but `exclude`d names and section fields (a
    whole stage config inside PipelineConfig, which cli.py offers as `--SECTION.OPTION`)."""
    hints = typing.get_type_hints(config_cls)
    found = []
    for f in dataclasses.fields(config_cls):
        if f.metadata.get("section"):
            continue
        if "embed" not in f.metadata:
            found.append(Option(f.name, f, hints[f.name], _default(f)))
            continue
        inner_cls, default = hints[f.name], _default(f)
        inner_hints = typing.get_type_hints(inner_cls)
        inner = {g.name: g for g in dataclasses.fields(inner_cls)}
        for name in f.metadata["embed"]:
            g = inner[name]
            value = MISSING if default is MISSING else getattr(default, name)
            found.append(Option(option_name(g), g, inner_hints[name], value, f.name))
    return [o for o in found if o.name not in exclude]


def option_name(f: dataclasses.Field) -> str:
    """The name a field is offered under: its metadata `option`, else its own."""
    return f.metadata.get("option", f.name)


def build(config_cls: type, values: dict[str, Any]) -> Any:
    """`config_cls` from option values: an embedded option replaces that field of the embedding
    field's default. TypeError for an unknown option (as the constructor's own); ValueError
    from validation."""
    known = {o.name: o for o in options(config_cls)}
    kwargs: dict[str, Any] = {}
    embedded: dict[str, dict[str, Any]] = {}
    for name, value in values.items():
        option = known.get(name)
        if option is None:
            kwargs[name] = value  # a section, a whole embedded config, or unknown: the class says
        elif option.section:
            embedded.setdefault(option.section, {})[option.field.name] = value
        else:
            kwargs[name] = value
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    for section, changes in embedded.items():
        base = kwargs.get(section)
        if base is None:
            base = _default(fields[section])
        kwargs[section] = dataclasses.replace(base, **changes)
    return config_cls(**kwargs)


def flatten(config: Any) -> dict[str, Any]:
    """Option name -> value of a config (a section, PipelineConfig's stage config, flattened in
    turn): what a stage's summary records, and what `build` takes back."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if "embed" in f.metadata:
            inner = {g.name: g for g in dataclasses.fields(value)}
            for name in f.metadata["embed"]:
                out[option_name(inner[name])] = getattr(value, name)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            out[f.name] = flatten(value)
        else:
            out[f.name] = value
    return out
