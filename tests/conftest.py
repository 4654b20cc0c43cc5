"""Shared fixtures: a real S3 API endpoint on 127.0.0.1 (moto's server) and the ../shared data."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from hashtag import storage


def _shared_dir() -> Path | None:
    for candidate in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")):
        if (candidate / "data").is_dir():
            return candidate
    return None


SHARED = _shared_dir()

# The moto server's static test credentials, set before any test starts Ray: local workers
# inherit this process's environment (only the endpoint travels in runtime_env, never keys).
for _key, _value in (
    ("AWS_ACCESS_KEY_ID", "testing"),
    ("AWS_SECRET_ACCESS_KEY", "testing"),
    ("AWS_DEFAULT_REGION", "us-east-1"),
):
    os.environ.setdefault(_key, _value)


def on_ci() -> bool:
    """CI (env CI=true, as GitHub Actions and most runners set it): what a developer's laptop
    may lack, CI must have; a missing ../shared there is a failure, not a skip."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> None:
    """Skip on a developer's machine, fail on CI: the real data is part of the suite there."""
    if on_ci():
        pytest.fail(f"{reason} (CI=true: the real data must be there)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if SHARED is None:
        missing("../shared (real data and models) is not beside this checkout")
    return SHARED


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1; AWS_* variables point every client (and Ray worker) at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    saved = {
        k: os.environ.get(k)
        for k in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_DEFAULT_REGION",
            storage.ENDPOINT_ENV,
        )
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    storage.set_s3_endpoint(url)
    yield url
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def s3_bucket(s3_endpoint) -> str:
    """A fresh, empty bucket; returns its s3:// URI."""
    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=name)
    return f"s3://{name}"
