"""The Ray cluster's auth token: kept in AWS SSM Parameter Store, copied to ~/.ray/auth_token.

On the laptop, once per cluster (needs ssm:PutParameter):

    python infra/ray_token.py put --parameter /hashtag/ray-auth-token --region us-east-1

generates a token, stores it as a SecureString and writes the laptop's ~/.ray/auth_token, which
`ray job submit` / `ray dashboard` read (with RAY_AUTH_MODE=token). It refuses to replace an
existing token (in SSM or in the local file: a live cluster's nodes and CLI use it) unless
given `--rotate`. Every node, before `ray start` (cluster.yaml's start commands; the instance
profile allows ssm:GetParameter on this one parameter only):

    python infra/ray_token.py fetch --parameter /hashtag/ray-auth-token --region us-east-1

The folder is created 0700 and the file 0600. The token never goes through a file in the
repository, the image or the autoscaler config, nor through a command line.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from pathlib import Path

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


class TokenExists(Exception):
    """A token is already there; replacing it needs --rotate."""


def write_token(token: str, path: Path = DEFAULT_TOKEN_PATH) -> Path:
    """Write `token` readable by its owner only: the folder 0700, the file 0600."""
    path = Path(path)
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
        os.chmod(path.parent, 0o700)  # mkdir's mode is filtered by the umask
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(token)
    os.chmod(path, 0o600)
    return path


def fetch(parameter: str, region: str, path: Path = DEFAULT_TOKEN_PATH) -> Path:
    """Copy the cluster's token from SSM to `path` (a node's start; overwriting is the point)."""
    import boto3

    response = boto3.client("ssm", region_name=region).get_parameter(
        Name=parameter, WithDecryption=True
    )
    return write_token(response["Parameter"]["Value"], path)


def put(parameter: str, region: str, path: Path = DEFAULT_TOKEN_PATH, rotate: bool = False) -> Path:
    """Make a new token, store it in SSM and in `path`; an existing one only with `rotate`."""
    import boto3

    path = Path(path)
    if path.exists() and not rotate:
        raise TokenExists(
            f"{path} already holds a token (another cluster's CLI may use it); "
            "rerun with --rotate to replace it, or pass --path for a different file"
        )
    client = boto3.client("ssm", region_name=region)
    token = secrets.token_hex(32)
    try:
        client.put_parameter(Name=parameter, Value=token, Type="SecureString", Overwrite=rotate)
    except client.exceptions.ParameterAlreadyExists:
        raise TokenExists(
            f"SSM parameter {parameter} already holds a cluster's token; rerun with --rotate to "
            "replace it (then restart the cluster: running nodes keep the old one)"
        ) from None
    return write_token(token, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["fetch", "put"])
    parser.add_argument("--parameter", default="/hashtag/ray-auth-token")
    parser.add_argument("--region", required=True)
    parser.add_argument("--path", type=Path, default=DEFAULT_TOKEN_PATH)
    parser.add_argument(
        "--rotate", action="store_true", help="put: replace an existing token (SSM and --path)"
    )
    args = parser.parse_args(argv)
    try:
        if args.action == "fetch":
            written = fetch(args.parameter, args.region, args.path)
        else:
            written = put(args.parameter, args.region, args.path, rotate=args.rotate)
    except TokenExists as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"ray auth token written to {written}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
