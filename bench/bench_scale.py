"""Scale benchmark: does a process's memory stay flat when the number of posts grows 16x?

    python bench/bench_scale.py --small 65536 --factor 16 --dim 256       # default budget
    python bench/bench_scale.py --small 65536 --factor 8 --s3 --memory-budget 0.05 --repeats 0

Writes synthetic shards in the real shard format (bench_merge.write_synthetic_shards: Zipf tags,
1% reposts) at two sizes `factor` apart, then, for each size, in a child process that starts its
own local Ray (so every Ray process of the run is a descendant of it):

- merge with 2 worker CPUs (`hashtag.merge.run`: Ray tasks); for the large size then 1- and
  2-CPU merges alternated `--repeats` times: the median rows/s at 2 CPUs over the median at 1
  (target >= 1.7x). The 2 cores of this sandbox are shared: the load average is printed, and a
  ratio measured under load says little about the code;
- one Tune trial, 1 epoch (`hashtag tune --epochs 1 --batch-sizes 256 --learning-rates 1e-3
  --references popularity`), with `--memory-budget` GB: a split set under it goes through the
  object store, over it the trial streams the dataset's parts.

With `--s3` the shards, the dataset and Tune's output live on an S3 API server on 127.0.0.1
(moto's, in this process: not one of the measured processes): merge reads shards and writes
parts through S3, tune streams them by byte ranges. The trial reports the bytes it read from
S3 (`remote_bytes_read`), and the child measures one shuffled pass over the training split
(what a streamed epoch reads) against the split's own bytes.

Peak RSS is sampled every 0.1 s from /proc: the high-water mark (VmHWM) of every descendant
process, so short peaks between samples are still seen as long as the process lives until the
next sample. The figure is the largest process of the run (target: the large size's peak under
1.5x the small size's); the table names the process. Ray's own processes (raylet, gcs_server)
are listed apart: their size is Ray's, not ours.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_merge import write_synthetic_shards  # noqa: E402

RAY_DAEMONS = ("raylet", "gcs_server", "dashboard", "log_monitor", "monitor.py", "runtime_env")


def _processes() -> dict[int, tuple[int, str, int]]:
    """pid -> (ppid, name, VmHWM bytes) of every process we can read."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        hwm = int(fields.get("VmHWM", "0 kB").split()[0]) * 1024
        name = fields.get("Name", "").strip()
        title = cmd.split(" ")[0] if cmd.startswith("ray::") else (cmd or name)[:80]
        found[int(entry)] = (int(fields["PPid"].split()[0]), title, hwm)
    return found


class PeakSampler:
    """Samples the VmHWM of `root` and all its descendants until stopped."""

    def __init__(self, root: int, every: float = 0.1):
        self.root, self.every, self.peaks = root, every, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            table = _processes()
            children: dict[int, list[int]] = {}
            for pid, (ppid, _, _) in table.items():
                children.setdefault(ppid, []).append(pid)
            stack = [self.root]
            while stack:
                pid = stack.pop()
                if pid in table:
                    _, name, hwm = table[pid]
                    old = self.peaks.get(pid, (name, 0))
                    # Ray renames a worker after each task: keep the name it had at its peak.
                    self.peaks[pid] = (name, hwm) if hwm > old[1] else old
                stack += children.get(pid, [])
            time.sleep(self.every)

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        ours = [(h, n) for n, h in self.peaks.values() if not any(d in n for d in RAY_DAEMONS)]
        ray = [(h, n) for n, h in self.peaks.values() if any(d in n for d in RAY_DAEMONS)]
        top, top_name = max(ours) if ours else (0, "")
        ray_top, ray_name = max(ray) if ray else (0, "")
        return {
            "peak_rss_mb": round(top / 2**20, 1),
            "process": top_name,
            "driver_peak_mb": round(self.peaks.get(self.root, ("", 0))[1] / 2**20, 1),
            "ray_daemon_peak_mb": round(ray_top / 2**20, 1),
            "ray_daemon": ray_name.split("/")[-1][:40],
        }


def run_child(argv: list[str]) -> tuple[dict, dict]:
    """Run this script in child mode; return (its JSON result, the peak RSS figures)."""
    env = {**os.environ, "TQDM_DISABLE": "1", "RAY_DEDUP_LOGS": "0"}
    child = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    sampler = PeakSampler(child.pid)
    out, err = child.communicate()
    peaks = sampler.stop()
    if child.returncode:
        print(err.decode(errors="replace")[-4000:], file=sys.stderr)
        raise SystemExit(f"child {argv} failed ({child.returncode})")
    return json.loads(out.decode().strip().splitlines()[-1]), peaks


def child_main(args: argparse.Namespace) -> None:
    import logging

    import ray

    logging.disable(logging.WARNING)
    for attempt in range(3):  # on a loaded machine Ray's start-up can miss its 30 s deadline
        try:
            ray.init(num_cpus=args.cpus, include_dashboard=False, logging_level="ERROR")
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    if args.merge_only:
        from hashtag import merge

        shards, out = args.merge_only
        summary = merge.run(merge.MergeConfig(shards=shards, out=out))
        result = {k: summary[k] for k in ("count", "seconds", "parts", "posts_in")}
    else:
        from hashtag import tune
        from hashtag.trial import BLOCK_ROWS

        data, out = args.tune_only
        config = tune.TuneConfig(
            data=data,
            out=out,
            batch_sizes=(256,),
            learning_rates=(1e-3,),
            epochs=1,
            references=("popularity",),
            memory_budget=args.memory_budget,
        )
        started = time.monotonic()
        summary = tune.run(config)
        trial = summary["trials"][0]
        dataset = _load(data)
        from hashtag.dataset import SPLITS

        needed = sum(dataset.split_bytes(s) for s in SPLITS)
        result = {
            "seconds": round(time.monotonic() - started, 1),
            "test_f1": trial["test"].get("f1"),
            "streamed": needed > tune.memory_budget_bytes(config),
            "train_split_bytes": dataset.split_count("train") * dataset.dim * 4,
        }
        if data.startswith("s3://"):
            import numpy as np

            from hashtag import storage

            result["trial_remote_bytes_read"] = _trial_remote_bytes(summary["experiment"])
            before = storage.remote_bytes_read()
            for _ in dataset.blocks("train", BLOCK_ROWS, np.random.default_rng(0)):
                pass
            result["epoch_remote_bytes_read"] = storage.remote_bytes_read() - before
    ray.shutdown()
    print(json.dumps(result))


def throughput(shards_root: str, folder: str, repeats: int) -> dict:
    """Merge rows/s with 1 and 2 worker CPUs, alternated `repeats` times after the first
    merge (so both read shards from a warm page cache, with no write-back of freshly written
    shards in flight); the ratio of the medians (what docs/scaling.md quotes) and of the best
    run of each."""
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(repeats):
        for cpus in (1, 2):
            out = os.path.join(folder, f"d{cpus}")
            result, _ = run_child(["--merge-only", shards_root, out, "--cpus", str(cpus)])
            rates[cpus].append(round(result["posts_in"] / result["seconds"]))
            shutil.rmtree(out, ignore_errors=True)
            print(f"merge with {cpus} CPU(s): {rates[cpus][-1]} rows/s")
    return {
        "rows_per_s_1cpu": rates[1],
        "rows_per_s_2cpu": rates[2],
        "ratio": round(statistics.median(rates[2]) / statistics.median(rates[1]), 2),
        "ratio_best": round(max(rates[2]) / max(rates[1]), 2),
        "load_average": os.getloadavg(),
    }


def _trial_remote_bytes(experiment: str) -> int | None:
    """`remote_bytes_read` of the (one) trial's last report, from Tune's result.json on S3."""
    from hashtag import storage

    for name in storage.listdir("s3://" + experiment.removeprefix("s3://")):
        if name.startswith("train_trial"):
            uri = storage.join("s3://" + experiment.removeprefix("s3://"), name, "result.json")
            lines = storage.read_text(uri).strip().splitlines()
            return json.loads(lines[-1]).get("remote_bytes_read")
    return None


def _load(uri: str):
    from hashtag.dataset import Dataset

    return Dataset.load(uri)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=65536, help="posts of the small size")
    parser.add_argument("--factor", type=int, default=16, help="large size = small x factor")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=8192)
    parser.add_argument(
        "--memory-budget", type=float, default=0.0, help="GB, as tune's flag (0: its default)"
    )
    parser.add_argument("--s3", action="store_true", help="shards, dataset, output on moto S3")
    parser.add_argument("--workdir", help="default: a temporary folder, removed at the end")
    parser.add_argument("--skip-tune", action="store_true", help="merge figures only")
    parser.add_argument("--repeats", type=int, default=2, help="1- and 2-CPU merges, alternated")
    parser.add_argument("--merge-only", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--tune-only", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--cpus", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.merge_only or args.tune_only:
        child_main(args)
        return

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-scale-")
    rows = {"small": args.small, "large": args.small * args.factor}
    figures: dict[str, dict] = {}
    server = _start_s3() if args.s3 else None
    try:
        for size, n in rows.items():
            folder = os.path.join(workdir, size) if not args.s3 else f"s3://bench/{size}"
            shards_root, data = f"{folder}/scrape", f"{folder}/dataset"
            started = time.monotonic()
            write_synthetic_shards(shards_root, n, args.dim, args.shard_size, 0.01)
            print(f"{size}: wrote {n:,} posts x {args.dim} in {time.monotonic() - started:.0f} s")
            merged, merge_peak = run_child(["--merge-only", shards_root, data, "--cpus", "2"])
            print(f"{size}: merge {merged} {merge_peak}")
            trial, trial_peak = (
                ({}, {"peak_rss_mb": float("nan")})
                if args.skip_tune
                else run_child(
                    ["--tune-only", data, f"{folder}/tune", "--cpus", "2"]
                    + ["--memory-budget", str(args.memory_budget)]
                )
            )
            print(f"{size}: tune {trial} {trial_peak}")
            figures[size] = {
                "posts": n,
                "kept": merged["count"],
                "merge_seconds": merged["seconds"],
                "merge_rows_per_s_2cpu": round(merged["posts_in"] / merged["seconds"]),
                "merge_peak": merge_peak,
                "trial": trial,
                "trial_peak": trial_peak,
            }
            if size == "large" and args.repeats:
                figures["throughput"] = throughput(shards_root, folder, args.repeats)
        small, large = figures["small"], figures["large"]
        figures["ratios"] = {
            "merge_peak_large_over_small": round(
                large["merge_peak"]["peak_rss_mb"] / small["merge_peak"]["peak_rss_mb"], 2
            ),
            "trial_peak_large_over_small": round(
                large["trial_peak"]["peak_rss_mb"] / small["trial_peak"]["peak_rss_mb"], 2
            ),
            "merge_2cpu_over_1cpu_medians": figures.get("throughput", {}).get("ratio"),
            "merge_2cpu_over_1cpu_best": figures.get("throughput", {}).get("ratio_best"),
            "merge_peak_large_minus_small_mb": round(
                large["merge_peak"]["peak_rss_mb"] - small["merge_peak"]["peak_rss_mb"], 1
            ),
            "trial_peak_large_minus_small_mb": round(
                large["trial_peak"]["peak_rss_mb"] - small["trial_peak"]["peak_rss_mb"], 1
            ),
        }
        print(json.dumps(figures, indent=2))
    finally:
        if server is not None:
            server.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _start_s3():
    """moto's S3 server on 127.0.0.1 with a bucket `bench`; children inherit the endpoint."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from hashtag import storage

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    storage.set_s3_endpoint(f"http://{host}:{port}")
    boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket="bench")
    return server


if __name__ == "__main__":
    main()
