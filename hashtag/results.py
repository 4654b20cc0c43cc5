"""What a stage's `run(config)` returns: a small typed result, the fields the CLI and the
pipeline act on (exit status, summary line), plus the stage's JSON summary as written to its
OUT/*.json (`result["key"]` reads it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StageResult:
    summary: dict[str, Any] = field(repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.summary[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.summary.get(key, default)

    @property
    def exit_code(self) -> int:
        return 0
