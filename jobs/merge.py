"""Ray job entrypoint: merge shards into one dataset with contiguous ids.

    ray job submit --working-dir . -- python jobs/merge.py --help

Same flags as `hashtag merge`, plus --config FILE.yaml. Inside `ray job submit` it joins that
cluster; run by hand, it starts a local Ray.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("merge", __file__))
