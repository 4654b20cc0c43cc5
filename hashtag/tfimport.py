"""Importing TensorFlow quietly: one place for what every module that needs it wants.

TensorFlow 2.2x prints several lines to the process's stderr from C++ when it loads ("All log
messages before absl::InitializeLog()...", oneDNN, "Could not find cuda drivers", cuInit),
before its own TF_CPP_MIN_LOG_LEVEL is read. Runs are quiet by default, so unless debug logging
is on (`-v`) the import runs with file descriptor 2 pointed at /dev/null.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from types import ModuleType

# File descriptor 2 is the process's: two threads swapping it at once could each restore the
# other's /dev/null. One (re-entrant) lock makes the swaps take turns.
_STDERR_LOCK = threading.RLock()


@contextlib.contextmanager
def quiet_native() -> Iterator[None]:
    """Native (C++) lines to stderr hidden inside the block unless debug logging is on: TF Lite
    announces "Created TensorFlow Lite XNNPACK delegate" on every interpreter."""
    if logging.getLogger("hashtag").isEnabledFor(logging.DEBUG):
        yield
        return
    with _STDERR_LOCK:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def tensorflow() -> ModuleType:
    """`import tensorflow`, its start-up chatter hidden unless debug logging is on."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_native():
        import tensorflow as tf

        tf.config.list_physical_devices("GPU")  # cuInit's complaint comes on first use
    return tf
