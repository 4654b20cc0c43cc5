"""Connecting to Ray: the cluster a job was submitted to, or a local one when run by hand."""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

# Variables that steer storage and must reach every worker: the S3 endpoint override (MinIO, a
# test server) and, only together with it, static test credentials. On AWS, workers use their
# instance profile and none of these is set.
_STORAGE_ENV = ("AWS_ENDPOINT_URL",)
_ENDPOINT_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


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
    """A runtime_env that forwards the storage settings of this process to Ray workers."""
    env = {name: os.environ[name] for name in _STORAGE_ENV if os.environ.get(name)}
    if env:
        env.update({n: os.environ[n] for n in _ENDPOINT_CREDENTIALS if os.environ.get(n)})
    return {"env_vars": env} if env else {}
