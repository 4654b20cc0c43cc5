"""Ray job entrypoint: the batch size x learning rate grid on Ray Tune.

    ray job submit --working-dir . -- python jobs/tune.py --help

Same flags as `hashtag tune`, plus --config FILE.yaml. Inside `ray job submit` it joins that
cluster; run by hand, it starts a local Ray.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("tune", __file__))
