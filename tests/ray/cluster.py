"""A simulated multi-node Ray cluster on this machine, for the tests of cluster behaviour.

- :func:`start_multi_node`, then :func:`connected` for each job (the nodes outlive the
  jobs): Ray's own :class:`ray.cluster_utils.Cluster`: a head with
  0 CPUs (like ``cluster.yaml``'s head, which runs no tasks) plus CPU worker nodes and
  "GPU" worker nodes (raylets that declare ``num_gpus=1`` and one CPU; CUDA is absent
  here, so model code on them falls back to the CPU, see
  :func:`mspray.device.resolve_device`).
- :func:`ray_start_head`: a ``ray start --head`` as a user runs it, in its own
  ``RAY_TMPDIR`` (so its address file never reaches the machine's ``/tmp/ray``).
- :func:`autoscaling_cluster`: the same head with Ray's real autoscaler (v1 monitor) over
  its fake multi-node provider, which starts and stops raylets on this machine. It starts
  with zero worker nodes; the node types mirror ``cluster.yaml`` (``cpu_worker``,
  ``gpu_worker`` with ``{"CPU": 4, "GPU": 1}``, ``min_workers: 0``), scaled down to fit
  2 cores (the CPUs are logical). mspray finds these node types through the config file
  its autoscaler monitor runs with, as on a ``ray up`` head.

Only one Ray can be connected per process: connecting disconnects the driver first (the
tests that do are run last, after every test of the session's ``ray_local``, see the root
``conftest.py``).

``ray.cluster_utils.AutoscalingCluster`` is not used as is: its ``start``/``shutdown`` run
``ray stop --force``, which kills every Ray on the machine, not only the one it started.
Here shutdown stops exactly the processes this cluster started (and those the autoscaler
started for it), by pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

#: Node types (logical resources) of the simulated cluster. The autoscaler's "GPU" node
#: type has 4 logical CPUs, so a GPU actor's CPU share (half of them per GPU) differs from
#: the pool's default of one.
CPU_NODE = {"CPU": 2}
GPU_NODE = {"CPU": 4, "GPU": 1}
#: CPUs of the "GPU" nodes of :func:`multi_node_cluster`: just the model actor's one, so
#: any decoding there would have to take it (the tests show it goes to the CPU node).
FIXED_GPU_NODE_CPUS = 1
#: Object store per node: small, the test data is tiny and 24 GiB is shared.
OBJECT_STORE_BYTES = 150 * 2**20


def free_port() -> int:
    """A TCP port free on this machine now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pids_of(cluster: Any) -> list[int]:
    """Every process of ``cluster``'s nodes and all their descendants (the autoscaler
    monitor's raylets of the worker nodes it launched, their Ray workers, ...)."""
    import psutil

    roots = []
    for node in [cluster.head_node, *cluster.worker_nodes]:
        if node is None:
            continue
        for infos in node.all_processes.values():
            roots.extend(info.process.pid for info in infos)
    pids = []
    for pid in roots:
        try:
            proc = psutil.Process(pid)
            pids.append(pid)
            pids.extend(c.pid for c in proc.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return pids


def stop_cluster(cluster: Any) -> None:
    """Disconnect, stop the cluster's nodes, then any descendant still alive (by pid)."""
    import psutil
    import ray

    pids = _pids_of(cluster)  # before the parents die and their children are re-parented
    ray.shutdown()
    cluster.shutdown()
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.terminate()
            procs.append(p)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


def _connect(cluster: Any, env: dict[str, str] | None) -> None:
    import ray

    runtime_env = {"env_vars": env} if env else None
    ray.init(address=cluster.address, runtime_env=runtime_env, log_to_driver=True)


def start_multi_node(cpu_nodes: int = 1, gpu_nodes: int = 1) -> Any:
    """A head (0 CPUs) plus ``cpu_nodes`` CPU and ``gpu_nodes`` "GPU" worker nodes, not
    connected; stop it with :func:`stop_cluster`. Returns the
    :class:`ray.cluster_utils.Cluster`."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "object_store_memory": OBJECT_STORE_BYTES},
    )
    try:
        for _ in range(cpu_nodes):
            cluster.add_node(num_cpus=CPU_NODE["CPU"], object_store_memory=OBJECT_STORE_BYTES)
        for _ in range(gpu_nodes):
            cluster.add_node(
                num_cpus=FIXED_GPU_NODE_CPUS,
                num_gpus=GPU_NODE["GPU"],
                object_store_memory=OBJECT_STORE_BYTES,
            )
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


@contextmanager
def connected(cluster: Any, env: dict[str, str] | None = None) -> Iterator[Any]:
    """The driver connected to ``cluster`` as a new job (``env``: extra environment of the
    job's workers), disconnected afterwards; the job's workers and actors end with it, the
    nodes stay up. Yields ``cluster``."""
    import ray

    ray.shutdown()
    _connect(cluster, env)
    try:
        yield cluster
    finally:
        ray.shutdown()


def autoscaler_config(gcs_address: str, max_cpu_workers: int, max_gpu_workers: int) -> dict:
    """A fake-multi-node autoscaler config whose node types mirror ``cluster.yaml``."""

    def node_type(resources: dict, max_workers: int) -> dict:
        res = {**resources, "object_store_memory": OBJECT_STORE_BYTES}
        return {"resources": res, "node_config": {}, "min_workers": 0, "max_workers": max_workers}

    return {
        "cluster_name": "mspray-fake",
        "max_workers": max_cpu_workers + max_gpu_workers,
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": gcs_address,
        },
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu_worker": node_type(CPU_NODE, max_cpu_workers),
            "gpu_worker": node_type(GPU_NODE, max_gpu_workers),
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,  # no scale-down during a test
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


@contextmanager
def autoscaling_cluster(
    tmp_path: Path,
    max_cpu_workers: int = 1,
    max_gpu_workers: int = 2,
    env: dict[str, str] | None = None,
) -> Iterator[Any]:
    """A head (0 CPUs) with the autoscaler and no worker nodes yet, the driver connected.
    Yields the :class:`ray.cluster_utils.Cluster` (its ``worker_nodes`` stays empty: the
    autoscaler's nodes are listed by ``ray.nodes()``)."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.util import get_node_ip_address

    ray.shutdown()
    port = free_port()
    config = tmp_path / "autoscaler.json"
    gcs = f"{get_node_ip_address()}:{port}"
    config.write_text(json.dumps(autoscaler_config(gcs, max_cpu_workers, max_gpu_workers)))
    # read by the monitor process the head starts (it inherits this environment)
    saved = {k: os.environ.get(k) for k in ("RAY_FAKE_CLUSTER", "AUTOSCALER_UPDATE_INTERVAL_S")}
    os.environ.update(RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
    try:
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 0,
                "object_store_memory": OBJECT_STORE_BYTES,
                "gcs_server_port": port,
                "autoscaling_config": str(config),
            },
        )
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    try:
        _connect(cluster, env)
        yield cluster
    finally:
        stop_cluster(cluster)


def worker_nodes() -> list[dict]:
    """The alive nodes other than the head (the one without CPUs), from ``ray.nodes()``."""
    import ray

    return [n for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]


def _ray_executable() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


def private_ray_env(tmp_root: Path) -> dict[str, str]:
    """This process's environment with Ray's temp root (and so its address file,
    ``<tmp_root>/ray/ray_current_cluster``) moved to ``tmp_root`` and no cluster named."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Token auth turns on whenever ~/.ray/auth_token exists: off, for these processes only.
    env.update(RAY_TMPDIR=str(tmp_root), RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    return env


@contextmanager
def ray_start_head(tmp_root: Path, num_cpus: int = 2) -> Iterator[str]:
    """``ray start --head`` (no dashboard, free ports) with ``RAY_TMPDIR=tmp_root``, as a user
    starts a small local cluster; yields its GCS address. Stopped by signalling the ``ray
    start --block`` process and killing, by pid, what is left of its process group; never
    ``ray stop``, which would stop every Ray on the machine."""
    ports = sorted({free_port() for _ in range(8)})[:6]
    gcs, agent_http, agent_grpc, rt_env, metrics, nm = ports
    cmd = [
        _ray_executable(), "start", "--head", "--block", "--disable-usage-stats",
        f"--port={gcs}", "--include-dashboard=false", f"--num-cpus={num_cpus}", "--num-gpus=0",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={nm}", f"--object-store-memory={OBJECT_STORE_BYTES}",
    ]  # fmt: skip
    log = open(tmp_root / "ray-start.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=private_ray_env(tmp_root),
        start_new_session=True,  # its own process group: ours to clean up
    )  # fmt: skip
    address_file = tmp_root / "ray" / "ray_current_cluster"
    try:
        deadline = time.monotonic() + 120
        while not address_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start failed:\n{(tmp_root / 'ray-start.log').read_text()}")
            time.sleep(0.5)
        yield address_file.read_text().strip()
    finally:
        ours = _ours(proc.pid, str(tmp_root))
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
        for pid in {*ours, *_ours(proc.pid, str(tmp_root))}:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        log.close()


def _ours(pgid: int, marker: str) -> list[int]:
    """Live processes in process group ``pgid`` or naming ``marker`` on their command line
    (from /proc; Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getpgid(int(entry.name)) == pgid or marker in cmdline:
                found.append(int(entry.name))
    return found
