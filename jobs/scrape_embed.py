"""Ray job entrypoint: scrape and embed posts into shards.

    ray job submit --working-dir . -- python jobs/scrape_embed.py --help

Same flags as `hashtag scrape`, plus --config FILE.yaml. Inside `ray job submit` it joins that
cluster; run by hand, it starts a local Ray.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("scrape", __file__))
