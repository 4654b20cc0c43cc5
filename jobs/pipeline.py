"""Ray job entrypoint: scrape -> merge -> tune -> export, end to end.

    ray job submit --working-dir . -- python jobs/pipeline.py --help

Same flags as `hashtag pipeline`, plus --config FILE.yaml. Inside `ray job submit` it joins that
cluster; run by hand, it starts a local Ray.
"""

import os
import sys

# Submitted with --working-dir, the package may not be installed on the node: use the copy.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hashtag.cli import run_stage  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_stage("pipeline", sys.argv[1:], prog="jobs/pipeline.py"))
