"""Ray job entrypoint: scrape -> merge -> tune -> export, end to end.

    ray job submit --working-dir . -- python jobs/pipeline.py --help

Same flags as `hashtag pipeline`, plus --config FILE.yaml. Inside `ray job submit` it joins that
cluster; run by hand, it starts a local Ray.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("pipeline", __file__))
