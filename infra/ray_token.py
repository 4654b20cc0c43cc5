"""The Ray cluster's auth token: kept in AWS SSM Parameter Store, copied to ~/.ray/auth_token.

On the laptop, once per cluster (needs ssm:PutParameter):

    python infra/ray_token.py put --parameter /hashtag/ray-auth-token --region us-east-1

generates a token, stores it as a SecureString and writes the laptop's ~/.ray/auth_token, which
`ray job submit` / `ray dashboard` read (with RAY_AUTH_MODE=token). Every node, before
`ray start` (cluster.yaml's start commands; the instance profile allows ssm:GetParameter on
this one parameter only):

    python infra/ray_token.py fetch --parameter /hashtag/ray-auth-token --region us-east-1

The token never goes through a file in the repository, the image or the autoscaler config.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


def write_token(token: str, path: Path = DEFAULT_TOKEN_PATH) -> Path:
    """Write `token` readable by its owner only (created 0600, never world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token)
    os.chmod(path, 0o600)
    return path


def fetch(parameter: str, region: str, path: Path = DEFAULT_TOKEN_PATH) -> Path:
    import boto3

    response = boto3.client("ssm", region_name=region).get_parameter(
        Name=parameter, WithDecryption=True
    )
    return write_token(response["Parameter"]["Value"], path)


def put(parameter: str, region: str, path: Path = DEFAULT_TOKEN_PATH) -> Path:
    import boto3

    token = secrets.token_hex(32)
    boto3.client("ssm", region_name=region).put_parameter(
        Name=parameter, Value=token, Type="SecureString", Overwrite=True
    )
    return write_token(token, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["fetch", "put"])
    parser.add_argument("--parameter", default="/hashtag/ray-auth-token")
    parser.add_argument("--region", required=True)
    parser.add_argument("--path", type=Path, default=DEFAULT_TOKEN_PATH)
    args = parser.parse_args(argv)
    action = fetch if args.action == "fetch" else put
    written = action(args.parameter, args.region, args.path)
    print(f"ray auth token written to {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
