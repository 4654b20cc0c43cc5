"""The project's error types: what the command line prints as one line instead of a traceback.

    UserError       a user mistake: missing or wrong input, a bad value, refused data. The CLI
                    prints `hashtag STAGE: error: MESSAGE` and exits 2. The message says what is
                    wrong and what to do.
    ArtifactError   a folder we wrote (shard, dataset, exported model, co-occurrence) that is
                    missing, of another format or version, damaged or tampered with. A UserError:
                    the fix is to rebuild it or point at the right one.

Anything else is a runtime failure (exit 1, one line; `-v` shows the traceback).
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake the user can fix; the message says how."""


class ArtifactError(UserError):
    """A stored artifact (shard, dataset, model) is missing, foreign, damaged or inconsistent."""
