"""The `kernel` reference at scale: fit time, peak memory, scoring time and export size.

    python bench/bench_kernel.py                       # 20,000 and 100,000 rows
    python bench/bench_kernel.py --rows 20000 --dim 2304 --tags 1000

Synthetic features shaped like the V2 + V1 ensemble (2,304-d, unit rows around 50 cluster
centres) with 1,000 tags (each row carries its cluster's 3 tags and a random one): what docs/
scaling.md quotes for kernel ridge ("Where the design bends first", item 5). Each size runs
in its own child process, so that its peak RSS (ru_maxrss: the process's high-water mark, the
rows themselves included) is its own. The fit is tune's: `reference_config("kernel")` (exact up
to 4,096 rows, Nystroem on 4,096 landmark rows beyond; its penalty chosen on 2,000 validation
rows); then 10,000 new rows are scored, and the model is saved to measure the export's bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def synthetic(rows: int, dim: int, tags: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(50, dim)).astype(np.float32)
    cluster = rng.integers(50, size=rows)
    X = centres[cluster] + 2.0 * rng.normal(size=(rows, dim)).astype(np.float32)
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    Y = np.zeros((rows, tags), bool)
    for k in range(3):
        Y[np.arange(rows), (cluster * 3 + k) % tags] = True
    Y[np.arange(rows), rng.integers(tags, size=rows)] = True
    return X, Y


def child(rows: int, dim: int, tags: int) -> dict:
    from hashtag import models, selection

    X, Y = synthetic(rows, dim, tags, 0)
    X_val, Y_val = synthetic(2_000, dim, tags, 1)
    model = models.create("kernel", selection.reference_config("kernel", 0))
    started = time.perf_counter()
    model.fit(X, Y, X_val, Y_val)
    fit_s = time.perf_counter() - started
    X_new, _ = synthetic(10_000, dim, tags, 2)
    started = time.perf_counter()
    model.predict_scores(X_new)
    score_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        model.save(folder)
        export = sum(f.stat().st_size for f in Path(folder).iterdir())
    return {
        "rows": rows,
        "fit_s": round(fit_s, 1),
        "score_10k_s": round(score_s, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "export_mb": round(export / 1e6, 1),
        "landmarks": len(model.landmarks),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="20000,100000", help="comma list of training rows")
    parser.add_argument("--dim", type=int, default=2304)
    parser.add_argument("--tags", type=int, default=1000)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dim, args.tags)))
        return
    print(f"load average at start: {os.getloadavg()[0]:.2f}", flush=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    for rows in (int(r) for r in args.rows.split(",")):
        command = [sys.executable, __file__, "--child", str(rows), "--dim", str(args.dim)]
        done = subprocess.run(
            [*command, "--tags", str(args.tags)], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(done.stderr[-3000:])
        result = json.loads(done.stdout.splitlines()[-1])
        print(
            f"kernel, {rows:,} rows x {args.dim}-d, {args.tags} tags: fit {result['fit_s']} s, "
            f"peak RSS {result['peak_rss_gb']} GB, scoring 10,000 rows {result['score_10k_s']} s, "
            f"export {result['export_mb']} MB ({result['landmarks']} landmarks)",
            flush=True,
        )


if __name__ == "__main__":
    main()
