"""The Ray cluster's auth token: kept in AWS SSM Parameter Store, copied to ~/.ray/auth_token.

On the laptop, once per cluster (needs ssm:PutParameter):

    python infra/ray_token.py put --parameter /hashtag/ray-auth-token --region us-east-1

generates a token, stores it as a SecureString and writes the laptop's ~/.ray/auth_token, which
`ray job submit` / `ray dashboard` read (with RAY_AUTH_MODE=token). It refuses to replace an
existing token (in SSM or in the local file: a live cluster's nodes and CLI use it) unless
given `--rotate`. Every node, before `ray start` (cluster.yaml's start commands; the instance
profile allows ssm:GetParameter on this one parameter only):

    python infra/ray_token.py fetch --parameter /hashtag/ray-auth-token --region us-east-1

The folder is made 0700 before the token is written, the file is created 0600 under a new name
(O_EXCL, O_NOFOLLOW) and renamed into place: an existing folder, file or link is never followed. The token never goes through a file in the
repository, the image or the autoscaler config, nor through a command line.
"""

from __future__ import annotations

import argparse
import os
import secrets
import stat
import sys
from pathlib import Path

DEFAULT_TOKEN_PATH = Path.home() / ".ray" / "auth_token"


class TokenExists(Exception):
    """A token is already there; replacing it needs --rotate."""


def write_token(token: str, path: Path = DEFAULT_TOKEN_PATH) -> Path:
    """Write `token` readable by its owner only, safely over whatever is there already:

    - the folder is created 0700, or, if it exists, must be a real folder (not a symbolic
      link) owned by us, and is made 0700 BEFORE anything is written into it;
    - the token goes to a new temporary file created O_EXCL | O_NOFOLLOW with mode 0600 (no
      other file, link or FIFO is ever opened for writing, and the bytes are never readable
      by others, whatever the umask), then renamed over `path` (a link at `path` is replaced,
      not followed)."""
    path = Path(path)
    folder = path.parent
    if not folder.exists() and not folder.is_symlink():
        folder.mkdir(mode=0o700, parents=True)
    info = os.lstat(folder)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise TokenExists(f"{folder} is not a folder (a symbolic link?): refusing to write there")
    if info.st_uid != os.getuid():
        raise TokenExists(f"{folder} belongs to another user: refusing to write a token there")
    os.chmod(folder, 0o700, follow_symlinks=False)  # before the token exists in it
    temporary = folder / f".{path.name}.{secrets.token_hex(8)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    descriptor = os.open(temporary, flags, 0o600)
    try:
        os.fchmod(descriptor, 0o600)
        with os.fdopen(descriptor, "w") as file:
            file.write(token)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
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
    if os.path.lexists(path) and not rotate:
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
