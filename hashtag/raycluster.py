"""Connecting to Ray: the cluster a job was submitted to, or a local one when run by hand."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# The one variable that steers storage and must reach every worker: the S3 endpoint override
# (MinIO, a test server). Never credentials: Ray writes a runtime_env in plain text into its
# logs, so workers take their keys from their own environment (a local cluster inherits the
# driver's; a real cluster uses instance roles).
_STORAGE_ENV = ("AWS_ENDPOINT_URL",)


def verbose() -> bool:
    """`-v` (the hashtag logger at DEBUG): Ray's and Tune's own output is shown only then."""
    return logging.getLogger("hashtag").isEnabledFor(logging.DEBUG)


def connect() -> None:
    """`ray.init()` once: inside `ray job submit` it joins that cluster, by hand it starts one.

    Quiet unless -v: no worker output forwarded to the driver (TensorFlow's notices in every
    trial), no start-up notices; task errors still reach the driver as exceptions."""
    import ray

    if ray.is_initialized():
        return
    loud = verbose()
    ray.init(
        logging_level=logging.INFO if loud else logging.ERROR,
        log_to_driver=loud,
        configure_logging=True,
    )
    resources = ray.cluster_resources()
    log.debug("connected to Ray: %s", {k: v for k, v in resources.items() if "node:" not in k})


def worker_env() -> dict[str, Any]:
    """A runtime_env that forwards the S3 endpoint of this process to Ray workers (no secret)."""
    env = {name: os.environ[name] for name in _STORAGE_ENV if os.environ.get(name)}
    return {"env_vars": env} if env else {}
