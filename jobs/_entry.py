"""What every jobs/*.py does: run one stage of `hashtag` from this checkout.

Submitted with `ray job submit --working-dir .`, the package may not be installed on the node,
so the checkout (the uploaded working dir) goes first on sys.path. Flags, --config FILE.yaml,
errors and exit status are the CLI's (`hashtag.cli.run_stage`), with the script as the program
name in --help.
"""

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(stage: str, script: str) -> int:
    """Run `stage` with this process's arguments; the exit status."""
    sys.path.insert(0, REPO)
    from hashtag.cli import run_stage

    return run_stage(stage, sys.argv[1:], prog=f"jobs/{os.path.basename(script)}")
