"""Real Ray clusters for tests: `ray start` processes on 127.0.0.1, token auth on.

    with RayCluster.start(num_cpus=2) as cluster:
        job = cluster.submit(["python", "jobs/pipeline.py", "--demo", "--out", out])
        assert cluster.wait(job) == "SUCCEEDED", cluster.logs(job)

Each cluster lives in its own short temp dir (Ray's unix sockets must fit in ~107 characters),
with its own free ports, its own HOME and token, and its own process group per `ray start`:
teardown kills those process groups, and any straggler whose command line names the temp dir,
so a test never stops anybody else's Ray. (`ray stop --force` would: it kills every Ray process
on the machine by name, whatever the environment says.)

`RayCluster.start(autoscaling=...)` starts the head of a simulated autoscaling cluster: Ray's
fake_multinode provider launches worker "nodes" (raylets) on this machine on demand, from node
types that mirror cluster.yaml.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
# Not uploaded with the job's working dir (the venv alone is hundreds of MB): the one list, the
# same file the README's `ray job submit --runtime-env infra/runtime_env.yaml` uses.
EXCLUDES = yaml.safe_load((REPO / "infra" / "runtime_env.yaml").read_text())["excludes"]
# The caller's Ray settings must not leak into a test cluster (or point its CLI elsewhere).
SCRUBBED_ENV = (
    "RAY_ADDRESS",
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_FAKE_CLUSTER",
    "RAY_TMPDIR",
)


def free_port() -> int:
    """A free TCP port on 127.0.0.1, outside Ray's default worker port range (10002-19999)."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if not 10002 <= port <= 19999:
            return port


def fake_autoscaling_config(
    gcs_port: int,
    *,
    cpu_workers: int = 2,
    cpus_per_worker: int = 1,
    gpu_workers: int = 1,
    idle_timeout_minutes: float = 0.15,
) -> dict:
    """An autoscaler config for Ray's fake_multinode provider, with cluster.yaml's node types.

    The head advertises no CPU (as on AWS); `cpu-worker` nodes carry CPUs for the embed tasks,
    `gpu-worker` nodes advertise GPU: 1 (there is no GPU: Ray only counts it) for Tune trials.
    """
    real = yaml.safe_load((REPO / "cluster.yaml").read_text())
    head = real["head_node_type"]
    gpu_type = next(n for n, t in real["available_node_types"].items() if t["resources"].get("GPU"))
    cpu_type = next(n for n in real["available_node_types"] if n not in (head, gpu_type))
    return {
        "cluster_name": f"fake-{uuid.uuid4().hex[:6]}",
        "max_workers": cpu_workers + gpu_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            # Where launched raylets join; the provider defaults to this machine's IP:6379.
            "gcs_address": f"127.0.0.1:{gcs_port}",
        },
        "head_node_type": head,
        "available_node_types": {
            head: {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            cpu_type: {
                "resources": {"CPU": cpus_per_worker},
                "node_config": {},
                "min_workers": 0,
                "max_workers": cpu_workers,
            },
            gpu_type: {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": gpu_workers,
            },
        },
        "auth": {},
        "docker": {},
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
    }


@dataclass(frozen=True)
class Process:
    """A process as /proc shows it (Linux): enough to find and kill our own."""

    pid: int
    name: str
    process_group: int
    cmdline: str


def processes() -> list[Process]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            # "pid (comm) state ppid pgrp ...": comm may hold spaces, so split after its ')'.
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            process_group = int(stat[stat.rindex(")") + 2 :].split()[2])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            found.append(Process(int(entry.name), name, process_group, cmdline))
    return found


def wait_gone(pids: list[int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if Path(f"/proc/{pid}").exists() and not _zombie(pid)]
        time.sleep(0.1)


def _zombie(pid: int) -> bool:
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] == "Z"
    return True


@dataclass
class Node:
    """One `ray start` we ran: its process group holds the node's daemons and workers."""

    name: str
    process_group: int

    def processes(self) -> list[Process]:
        return [p for p in processes() if p.process_group == self.process_group]

    def raylet(self) -> Process:
        for process in self.processes():
            if process.name == "raylet":
                return process
        raise RuntimeError(f"no raylet left in node {self.name}")

    def kill_raylet(self) -> int:
        """SIGKILL this node's raylet (a node lost without warning); returns its pid."""
        pid = self.raylet().pid
        os.kill(pid, signal.SIGKILL)
        return pid


@dataclass
class RayCluster:
    root: Path
    gcs_port: int
    dashboard_port: int
    env: dict[str, str]
    token: str
    nodes: list[Node] = field(default_factory=list)

    # --- lifecycle ----------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        *,
        num_cpus: int = 2,
        autoscaling: dict | None = None,
        system_config: dict | None = None,
        root: Path | None = None,
        timeout: float = 60,
    ) -> RayCluster:
        """Start a head on 127.0.0.1 with token auth; `autoscaling` from fake_autoscaling_config.

        `autoscaling` may be a callable gcs_port -> config (the config must name the GCS port).
        """
        root = Path(root or tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        home = root / "home"
        home.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in SCRUBBED_ENV}
        env.update(HOME=str(home), RAY_AUTH_MODE="token", PYTHONUNBUFFERED="1")
        # The token, made the documented way, into this cluster's own HOME.
        subprocess.run(
            [RAY, "get-auth-token", "--generate"], env=env, capture_output=True, check=True
        )
        token_path = home / ".ray" / "auth_token"
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
        cluster = cls(
            root=root,
            gcs_port=free_port(),
            dashboard_port=free_port(),
            env=env,
            token=token_path.read_text().strip(),
        )
        args = [
            "--head",
            f"--port={cluster.gcs_port}",
            f"--dashboard-port={cluster.dashboard_port}",
            "--dashboard-host=127.0.0.1",
            f"--num-cpus={num_cpus}",
        ]
        if autoscaling is not None:
            config = autoscaling(cluster.gcs_port) if callable(autoscaling) else autoscaling
            config_path = root / "autoscaling.yaml"
            config_path.write_text(yaml.safe_dump(config))
            cluster.env["RAY_FAKE_CLUSTER"] = "1"
            args.append(f"--autoscaling-config={config_path}")
        if system_config:
            args.append(f"--system-config={json.dumps(system_config)}")
        try:
            cluster._ray_start("head", args)
            cluster._wait_for_dashboard(timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def add_worker(self, num_cpus: int = 1, name: str | None = None) -> Node:
        """A second raylet on this machine that joins the head (a 'worker node')."""
        return self._ray_start(
            name or f"worker-{len(self.nodes)}",
            [f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}"],
        )

    def _ray_start(self, name: str, args: list[str]) -> Node:
        command = [
            RAY,
            "start",
            *args,
            "--node-ip-address=127.0.0.1",
            f"--temp-dir={self.root / 'r'}",
            f"--ray-client-server-port={free_port()}",
            "--dashboard-agent-listen-port=0",
            "--disable-usage-stats",
        ]
        # A new session: every daemon `ray start` leaves behind stays in this process group.
        process = subprocess.Popen(
            command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        node = Node(name, process.pid)
        self.nodes.append(node)
        output, _ = process.communicate(timeout=120)
        (self.root / f"ray-start-{name}.log").write_text(output)
        if process.returncode != 0:
            raise RuntimeError(f"`ray start` for {name} failed:\n{output[-3000:]}")
        return node

    def stop(self) -> None:
        """Kill this cluster's processes only (by process group, then by temp dir); remove it."""
        for node in self.nodes:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(node.process_group, signal.SIGKILL)
        stragglers = []
        marker = str(self.root)
        for process in processes():
            if process.pid != os.getpid() and marker in process.cmdline:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(process.pid, signal.SIGKILL)
                    stragglers.append(process.pid)
        wait_gone(stragglers)
        self.nodes.clear()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.cleanup()

    # --- the job server (HTTP, with the token) -----------------------------------------------

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def http(self, path: str, *, token: str | None = "cluster") -> tuple[int, object]:
        """GET the dashboard's `path` with this cluster's token (or `token`, or None: no header)."""
        request = urllib.request.Request(self.dashboard + path)
        if token is not None:
            value = self.token if token == "cluster" else token
            request.add_header("Authorization", f"Bearer {value}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as error:
            return error.code, error.read().decode(errors="replace")
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def _wait_for_dashboard(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(OSError):
                if self.http("/api/jobs/")[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the job server at {self.dashboard} did not answer")
            time.sleep(0.5)

    def submit(
        self,
        entrypoint: list[str],
        *,
        working_dir: Path | None = REPO,
        excludes: list[str] | None = None,
        env_vars: dict[str, str] | None = None,
        cli_env: dict[str, str | None] | None = None,
        check: bool = True,
    ) -> str | subprocess.CompletedProcess:
        """`ray job submit --no-wait`; returns the submission id (or, check=False, the run).

        `working_dir=None` uploads nothing: the nodes already have the project (as in the
        node image); `cli_env` changes the CLI's environment (None removes a variable): to submit without
        the token, for instance.
        """
        submission_id = f"test-{uuid.uuid4().hex[:10]}"
        runtime_env: dict = {}
        options = []
        if working_dir is not None:
            runtime_env["excludes"] = EXCLUDES if excludes is None else excludes
            options.append(f"--working-dir={working_dir}")
        if env_vars:
            runtime_env["env_vars"] = env_vars
        command = [
            RAY,
            "job",
            "submit",
            f"--address={self.dashboard}",
            *options,
            f"--runtime-env-json={json.dumps(runtime_env)}",
            f"--submission-id={submission_id}",
            "--no-wait",
            "--",
            *entrypoint,
        ]
        env = {**self.env, **(cli_env or {})}
        run = subprocess.run(
            command,
            env={k: v for k, v in env.items() if v is not None},
            capture_output=True,
            text=True,
            timeout=120,
        )
        if not check:
            return run
        if run.returncode != 0:
            raise RuntimeError(
                f"`ray job submit` failed:\n{run.stdout[-2000:]}{run.stderr[-3000:]}"
            )
        return submission_id

    def status(self, job: str) -> str:
        code, body = self.http(f"/api/jobs/{job}")
        if code != 200:
            raise RuntimeError(f"job {job}: HTTP {code}: {body}")
        return body["status"]

    def logs(self, job: str) -> str:
        code, body = self.http(f"/api/jobs/{job}/logs")
        return body.get("logs", "") if code == 200 else f"(no logs: HTTP {code})"

    def wait(self, job: str, timeout: float = 240, until=TERMINAL, poll: float = 1.0) -> str:
        """Poll until the job's status is in `until`; returns it (TimeoutError with the logs)."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(job)
            if status in until:
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job} still {status} after {timeout} s:\n{self.logs(job)[-4000:]}"
                )
            time.sleep(poll)

    # --- what the cluster looks like ----------------------------------------------------------

    def list_nodes(self) -> list[dict]:
        """Ray's state API: one dict per node ever seen (state ALIVE / DEAD, resources_total...)."""
        code, body = self.http("/api/v0/nodes?limit=1000&detail=1")
        if code != 200:
            raise RuntimeError(f"/api/v0/nodes: HTTP {code}: {body}")
        return body["data"]["result"]["result"]

    def wait_for_nodes(self, count: int, timeout: float = 60) -> list[dict]:
        """Until `count` nodes are alive; returns them, oldest first."""
        deadline = time.monotonic() + timeout
        while True:
            alive = [n for n in self.list_nodes() if n["state"] == "ALIVE"]
            if len(alive) >= count:
                return sorted(alive, key=lambda n: n["start_time_ms"])
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {count} nodes alive after {timeout} s")
            time.sleep(0.5)

    def watch_workers(self, job: str, done: Path, timeout: float = 300) -> dict:
        """Poll until `job` ends: its status, the most worker nodes alive at once, whether the job
        was still at work (`done` not yet written) when that many were first alive, and when."""
        peak = {"alive": 0, "while_working": False, "peak_at_s": None}
        start = time.monotonic()
        while (status := self.status(job)) not in TERMINAL:
            if time.monotonic() - start > timeout:
                raise TimeoutError(f"job {job} still {status}:\n{self.logs(job)[-4000:]}")
            nodes = self.list_nodes()
            alive = sum(n["state"] == "ALIVE" and not n["is_head_node"] for n in nodes)
            if alive > peak["alive"]:
                working = not done.exists() and self.status(job) == "RUNNING"
                peak.update(alive=alive, while_working=working)
                peak["peak_at_s"] = round(time.monotonic() - start, 1)
            time.sleep(0.5)
        return {"status": status, **peak, "job_s": round(time.monotonic() - start, 1)}

    def list_tasks(self, name: str) -> list[dict]:
        """Ray's state API: tasks called `name` (state, node_id...)."""
        code, body = self.http(
            f"/api/v0/tasks?limit=10000&detail=1&filter_keys=name&filter_predicates=%3D&filter_values={name}"
        )
        if code != 200:
            raise RuntimeError(f"/api/v0/tasks: HTTP {code}: {body}")
        return body["data"]["result"]["result"]

    def session_logs(self) -> Path:
        return self.root / "r" / "session_latest" / "logs"

    def autoscaler_log(self) -> str:
        """The autoscaler's own logs ('Adding N node(s) of type ...', 'Terminating'): monitor.log,
        its rotations and monitor.out/.err, where some Ray versions print the same events."""
        paths = sorted(self.session_logs().glob("monitor*"))
        return "\n".join(p.read_text(errors="replace") for p in paths if p.is_file())


# --- a fetch-bound source ---------------------------------------------------------------------


class SlowFiles(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, each answer after `delay_s` (a remote server's latency)."""

    delay_s = 0.1

    def do_GET(self):  # noqa: N802 (http.server's naming)
        time.sleep(self.delay_s)
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def slow_image_source(root: Path, posts: int, delay_s: float = 0.1) -> Iterator[Path]:
    """A JSONL manifest of `posts` small demo posts (hashtag.demo) whose images an HTTP server on
    127.0.0.1 serves, each after `delay_s`: a scrape bound by fetching, as from a remote CDN,
    whose work a 2-core machine can spread over many one-CPU "nodes". Scrape it with
    `--allow-private-addresses`."""
    from hashtag import demo
    from hashtag.sources import open_source

    folder = root / "demo"
    demo.run(demo.DemoConfig(out=str(folder), posts=posts, image_size=64))
    handler = type("Handler", (SlowFiles,), {"delay_s": delay_s})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **k: handler(*a, directory=str(folder), **k)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    manifest = root / "posts.jsonl"
    with manifest.open("w") as rows:
        for post in open_source(str(folder)).posts():
            image = f"{base}/{Path(post.image).relative_to(folder).as_posix()}"
            row = {"id": post.id, "image": image, "tags": list(post.tags), "caption": post.caption}
            rows.write(json.dumps(row) + "\n")
    try:
        yield manifest
    finally:
        server.shutdown()
        server.server_close()
