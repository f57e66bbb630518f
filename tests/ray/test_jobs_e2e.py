"""End to end through a real Ray cluster: ``ray start --head`` as separate processes, jobs
submitted through the Job Submission API (the same path as ``ray job submit --working-dir .``),
then the outputs checked and the cluster stopped.

The cluster is private to this module: its own temp dir and free ports (GCS, dashboard/job
API, client server, agents, worker port range), so it never meets the session-scoped
``ray_local`` of the other tests. ``ray stop`` is not scoped (it kills every Ray process on
the machine), so the cluster is stopped by signalling the ``ray start --block`` process we
started (it drains and kills its own children), and then by killing, by pid, anything left
that belongs to our process group or names our temp dir.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cluster import free_port  # tests/ray/cluster.py

from mspray.model.backbone import random_stem_state
from mspray.model.scales import STEM_LAYERS

REPO = Path(__file__).resolve().parents[2]
CLUSTER_CPUS = 4  # logical CPUs: Train worker + Data actors on a 2-core machine
START_TIMEOUT_S = 90
JOB_TIMEOUT_S = 240


# ------------------------------------------------------------------------------ helpers
def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def _free_port_range(width: int) -> tuple[int, int]:
    """A contiguous range of free ports below the kernel's ephemeral range (32768+) and
    above Ray's default worker range (10002-19999)."""
    rng = random.Random()
    for _ in range(200):
        lo = rng.randrange(20000, 32000 - width)
        if all(_port_free(p) for p in range(lo, lo + width)):
            return lo, lo + width - 1
    raise RuntimeError("no free port range for Ray workers")


def _ray_executable() -> str:
    exe = Path(sys.executable).parent / "ray"
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


@dataclass
class LocalCluster:
    """A running private Ray cluster."""

    gcs_address: str
    dashboard_url: str
    temp_dir: Path
    work_dir: Path
    process: subprocess.Popen

    def client(self):  # -> JobSubmissionClient
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.dashboard_url)

    def run_job(self, entrypoint: str, timeout_s: float = JOB_TIMEOUT_S) -> tuple[str, str]:
        """Submit ``entrypoint`` with the repository as working_dir; wait for a terminal
        state. Returns (status, logs)."""
        from ray.job_submission import JobStatus

        client = self.client()
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": str(REPO), "env_vars": {"MSPRAY_OFFLINE": "1"}},
        )
        deadline = time.monotonic() + timeout_s
        status = client.get_job_status(job_id)
        while not status.is_terminal():
            if time.monotonic() > deadline:
                client.stop_job(job_id)
                logs = client.get_job_logs(job_id)
                raise AssertionError(f"job {job_id} still {status} after {timeout_s}s:\n{logs}")
            time.sleep(1.0)
            status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}:\n{logs}"
        return str(status), logs


def _wait_for_dashboard(
    url: str, proc: subprocess.Popen, log: Path, token: str | None = None
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited {proc.returncode}:\n{log.read_text()}")
        try:
            req = urllib.request.Request(f"{url}/api/version", headers=auth)
            with urllib.request.urlopen(req, timeout=2) as r:
                if json.loads(r.read()).get("ray_version"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"dashboard at {url} did not come up:\n{log.read_text()}")


def _stop_cluster(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Stop only what we started: SIGTERM to ``ray start --block`` (it shuts its node
    down), then SIGKILL by pid for anything of ours still alive."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    leftovers = _our_pids(proc.pid, str(temp_dir))
    for pid in leftovers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while leftovers and time.monotonic() < deadline:
        leftovers = [p for p in leftovers if Path(f"/proc/{p}").exists()]
        time.sleep(0.2)


def _our_pids(pgid: int, marker: str) -> list[int]:
    """Live processes in process group ``pgid`` or naming ``marker`` in their command line
    (from /proc; Linux)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getpgid(pid) == pgid or marker in cmdline:
                found.append(pid)
        except (OSError, ProcessLookupError):
            continue
    return found


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[LocalCluster]:
    """A private Ray head (``ray start --head --block``) with the dashboard / job API on."""
    with private_head() as cluster:
        yield cluster


@contextlib.contextmanager
def private_head(auth_token: str | None = None) -> Iterator[LocalCluster]:
    """The head of :func:`ray_cluster`; with ``auth_token``, token authentication on
    (``RAY_AUTH_MODE=token``) with that token, as a secured cluster runs."""
    # Short path: Ray's unix sockets live under it (108-byte limit).
    temp_dir = Path(tempfile.mkdtemp(prefix="mspray-rc-", dir="/tmp"))
    work_dir = Path(tempfile.mkdtemp(prefix="mspray-e2e-"))
    gcs, dash, client, agent_http, agent_grpc, rt_env, metrics, nm, om = _free_ports(9)
    lo, hi = _free_port_range(100)
    cmd = [
        _ray_executable(), "start", "--head", "--block", "--disable-usage-stats",
        f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
        f"--node-manager-port={nm}", f"--object-manager-port={om}",
        f"--min-worker-port={lo}", f"--max-worker-port={hi}",
        f"--num-cpus={CLUSTER_CPUS}", "--num-gpus=0", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.pop("RAY_API_SERVER_ADDRESS", None)
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # Ray >= 2.5x turns token auth on whenever ~/.ray/auth_token exists (ray.init() creates
    # one), which makes this fixture depend on the machine's history. A private loopback
    # cluster for one test: auth off, explicitly, for its processes only.
    env["RAY_AUTH_MODE"] = "token" if auth_token else "disabled"
    if auth_token:
        env["RAY_AUTH_TOKEN"] = auth_token
    # No Serve proxies to quiesce: skip the SIGTERM drain wait (30 s) at teardown.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    log = temp_dir / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=work_dir,
            start_new_session=True,  # its own process group: ours to clean up, by pid
        )  # fmt: skip
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(url, proc, log, auth_token)
        yield LocalCluster(f"127.0.0.1:{gcs}", url, temp_dir, work_dir, proc)
    finally:
        _stop_cluster(proc, temp_dir)
        shutil.rmtree(work_dir, ignore_errors=True)
        shutil.rmtree(temp_dir, ignore_errors=True)


# ------------------------------------------------------------------------------ tests
@pytest.mark.slow
@pytest.mark.ray
def test_job_api_runs_repo_code(ray_cluster: LocalCluster) -> None:
    """The Job API is up, ships the repository as working_dir and mspray imports from it."""
    code = (
        "import ray, mspray, pathlib; ray.init(); "
        "print('CPUS', ray.cluster_resources()['CPU']); "
        "print('CWD_HAS_RAY_JOBS', pathlib.Path('ray_jobs').is_dir())"
    )
    _, logs = ray_cluster.run_job(f'python -c "{code}"', timeout_s=120)
    assert f"CPUS {float(CLUSTER_CPUS)}" in logs
    assert "CWD_HAS_RAY_JOBS True" in logs


def test_ray_jobs_help_with_plain_python() -> None:
    """Every job script runs with plain ``python`` (here: ``--help``, no Ray started)."""
    for job in sorted((REPO / "ray_jobs").glob("*.py")):
        r = subprocess.run(
            [sys.executable, str(job), "--help"], capture_output=True, text=True, timeout=120
        )
        assert r.returncode == 0, f"{job.name} --help failed:\n{r.stderr}"
        assert "usage:" in r.stdout


@dataclass
class Trained:
    """The output of the training job."""

    bundle: Path
    test_dir: Path  # test images (good, defects, one broken file)
    meta: dict


@pytest.fixture(scope="module")
def trained(ray_cluster: LocalCluster) -> Trained:
    """ray_jobs/train.py (Ray Train, one worker) submitted on a tiny synthetic set."""
    from mspray.data.synthetic import make_synthetic_dataset

    work = ray_cluster.work_dir
    make_synthetic_dataset(
        str(work / "data"), "synthetic", n_train=8, n_test_good=2, n_test_defect=3, size=64, seed=0
    )
    test_dir = work / "data" / "synthetic" / "test"
    (test_dir / "broken.png").write_bytes(b"not an image")  # gets an error row, not a failure
    # Fields with no command-line flag go through --config.
    config = work / "tiny.json"
    config.write_text(
        json.dumps(
            {
                # the last epoch's weights: the shared stem is then surely a trained one
                "train": {
                    "n_centers": 4,
                    "center_update_every": 1,
                    "val_fraction": 0.25,
                    "selection": "last",
                },
                "bank": {"coreset_ratio": 0.5},
            }
        )
    )
    bundle = work / "bundle"
    # a stand-in for the ImageNet file (none can be downloaded here): the path a user with
    # weights takes, where the scales share one stem
    torch.save(random_stem_state(STEM_LAYERS, seed=7), work / "vgg16-stand-in.pth")
    _, logs = ray_cluster.run_job(
        f"python ray_jobs/train.py -q --data mvtec:{work / 'data'} --category synthetic "
        f"--out {bundle} --storage {work / 'ray_runs'} --workers 1 --config {config} "
        "--epochs 1 --image-size 64 --scales 32,16 --samples-per-image 4 --batch-size 8 "
        f"--weights {work / 'vgg16-stand-in.pth'} --device cpu"
    )
    version = bundle / "versions" / (bundle / "latest").read_text().strip()
    for name in ("config.json", "model.safetensors", "bank_32.faiss", "bank_16.faiss"):
        assert (version / name).is_file(), f"{name} missing; job logs:\n{logs}"
    meta = json.loads((version / "meta.json").read_text())
    return Trained(bundle, test_dir, meta)


@pytest.mark.slow
@pytest.mark.ray
def test_train_job_writes_bundle(trained: Trained) -> None:
    meta = trained.meta
    assert meta["threshold"] is not None and meta["pretrained_loaded"] is True
    assert set(meta["bank_sizes"]) == {"32", "16"} and all(meta["bank_sizes"].values())
    version = trained.bundle / "versions" / trained.meta["version"]
    cfg = json.loads((version / "config.json").read_text())
    assert cfg["model"]["scales"] == [32, 16] and cfg["model"]["image_size"] == 64
    assert cfg["train"]["epochs"] == 1 and cfg["train"]["n_centers"] == 4
    assert cfg["train"]["workers"] == 1
    # scale 16 trained the shared stem on Ray Train and scale 32 was trained from it
    from safetensors.torch import load_file

    assert cfg["model"]["shared_stem"] is True
    weights = load_file(version / "model.safetensors")
    initial = torch.load(trained.bundle.parent / "vgg16-stand-in.pth", weights_only=True)
    for key, init in initial.items():
        stem16 = weights[f"scales.16.encoder.{key}"]
        assert torch.equal(weights[f"scales.32.encoder.{key}"], stem16), key
        assert not torch.equal(stem16, init), key
    # every step ran on the Ray executor (banks and threshold on the Ray Data actor pool)
    assert meta["pipeline"]["executor"] == "ray"
    steps = [s["step"] for s in meta["pipeline"]["steps"]]
    assert steps == ["split", "train", "select", "embed", "coreset", "calibrate"]
    assert meta["calibration"]["n"] == 8


@pytest.mark.slow
@pytest.mark.ray
def test_score_job_writes_one_row_per_image(ray_cluster: LocalCluster, trained: Trained) -> None:
    """ray_jobs/score.py (Ray Data) over the test images, a broken file among them."""
    import pyarrow.parquet as pq

    n_images = len(list(trained.test_dir.rglob("*.png")))
    out = ray_cluster.work_dir / "scores"
    summary_file = ray_cluster.work_dir / "summary.json"
    _, logs = ray_cluster.run_job(
        f"python ray_jobs/score.py -q --bundle {trained.bundle} --input {trained.test_dir} "
        f"--output {out} --workers 1 --maps --summary-json {summary_file}"
    )
    rows = pq.read_table(out).to_pylist()
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)) == n_images, logs
    bad = [r for r in rows if r["path"].endswith("broken.png")]
    assert len(bad) == 1 and bad[0]["error"] and bad[0]["image_score"] is None
    good = [r for r in rows if not r["path"].endswith("broken.png")]
    assert all(r["error"] is None and r["image_score"] is not None for r in good)
    assert {r["model_version"] for r in good} == {trained.meta["version"]}
    summary = json.loads(summary_file.read_text())
    assert summary["images"] == n_images and summary["errors"] == 1
    assert summary["missing"] == 0 and summary["duplicates"] == 0
    assert len(list((out / "_maps").rglob("*.png"))) == n_images - 1


def _predict(port: int, image: bytes) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/predict",
        data=image,
        headers={"content-type": "image/png"},
        method="POST",
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def _get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=60) as r:
        return json.loads(r.read())


@pytest.mark.slow
@pytest.mark.ray
def test_deploy_job_serves_the_bundle_and_updates_in_place(
    ray_cluster: LocalCluster, trained: Trained
) -> None:
    """ray_jobs/deploy.py deploys serve_config.yaml with the new bundle through the Serve
    REST API and waits for RUNNING; it answers. A second deploy changing only a reloadable
    setting is applied by the same replica (no restart) and also waits for RUNNING."""
    from mspray.ray.serve.deploy import apply_overrides, deploy, load_config

    port = free_port()
    _, logs = ray_cluster.run_job(
        f"python ray_jobs/deploy.py --bundle {trained.bundle} --device cpu --num-cpus 1 "
        f"--replicas 1 --max-replicas 1 --http-host 127.0.0.1 --http-port {port} "
        "--timeout 150",
        timeout_s=200,
    )
    assert '"RUNNING"' in logs
    image = next(trained.test_dir.rglob("good/*.png")).read_bytes()
    body = _predict(port, image)
    assert body["model_version"] == trained.meta["version"]
    assert isinstance(body["image_score"], float) and isinstance(body["is_anomalous"], bool)
    replica = _get(port, "/v1/stats")["replica"]

    # From outside the cluster, by dashboard URL: only user_config changes.
    overrides = {"bundle_uri": str(trained.bundle), "device": "cpu", "max_batch_size": 4,
                 "num_cpus": 1.0, "replicas": 1, "max_replicas": 1}  # fmt: skip
    config = apply_overrides(
        load_config(str(REPO / "serve_config.yaml")), overrides,
        http_host="127.0.0.1", http_port=port,
    )  # fmt: skip
    result = deploy(config, ray_cluster.dashboard_url, timeout=150)
    assert result["status"] == {"mspray": "RUNNING"}
    info = _get(port, "/v1/model")
    assert info["serving"]["max_batch_size"] == 4
    assert _get(port, "/v1/stats")["replica"] == replica  # reconfigured in place
    assert _predict(port, image)["model_version"] == trained.meta["version"]


def _deploy_main(argv: list[str]) -> int:
    """``mspray deploy`` with the repository's serve_config.yaml, as ray_jobs/deploy.py runs it."""
    from mspray.cli import main

    return main(["deploy", "--config", str(REPO / "serve_config.yaml"), *argv])


@pytest.mark.slow
@pytest.mark.ray
def test_deploy_failure_reports_the_deployment_message(
    ray_cluster: LocalCluster, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A bundle the replicas cannot load (past the skipped pre-check): the job library waits
    for DEPLOY_FAILED and exits 2 with the replica's own error. Runs last on the cluster:
    the PUT replaces every application there."""
    missing = tmp_path / "no-such-bundle"
    argv = ["--address", ray_cluster.dashboard_url, "--bundle", str(missing), "--no-bundle-check",
            "--device", "cpu", "--replicas", "1", "--timeout", "240"]  # fmt: skip
    code = _deploy_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "DEPLOY_FAILED" in err and "no-such-bundle" in err and "no such bundle" in err


def test_deploy_dry_run_applies_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """No Ray: reloadable overrides land in the detector's user_config, the others in the
    application's args, and the result validates; bad settings fail before any network."""
    from mspray.ray.serve.deploy import DeployError, apply_overrides, check_config, load_config

    deploy_main = _deploy_main
    argv = ["--dry-run", "--bundle", "s3://bucket/bundles/v9", "--num-gpus", "1",
            "--max-replicas", "7", "--max-batch-size", "32", "--http-port", "8123"]  # fmt: skip
    assert deploy_main(argv) == 0
    cfg = json.loads(capsys.readouterr().out)
    app = cfg["applications"][0]
    (dep,) = app["deployments"]
    assert dep["name"] == "MSPrayDetector"
    assert dep["user_config"]["bundle_uri"] == "s3://bucket/bundles/v9"
    assert dep["user_config"]["max_batch_size"] == 32
    assert app["args"]["num_gpus"] == 1 and app["args"]["max_replicas"] == 7
    assert cfg["http_options"]["port"] == 8123
    # A typo in the serving settings is caught before anything reaches the cluster ...
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "serve_config.yaml").read_text().replace("bank_gpu:", "bank_gpuu:"))
    assert deploy_main(["--dry-run", "--config", str(bad)]) == 2
    assert "bank_gpuu" in capsys.readouterr().err
    # ... so is a batch size the replicas' max_ongoing_requests could never fill ...
    assert deploy_main(["--dry-run", "--max-batch-size", "128"]) == 2
    assert "max_batch_size" in capsys.readouterr().err
    # ... a bundle that is not there (checked when not a dry run, before connecting) ...
    assert deploy_main(["--bundle", str(tmp_path / "nothing"), "--address", "http://x:1"]) == 2
    assert "no such bundle" in capsys.readouterr().err
    # ... and an override the config's deployments section would silently shadow.
    raw = {"applications": [{"name": "m", "import_path": "mspray.ray.serve:build_app",
           "deployments": [{"name": "MSPrayDetector", "num_replicas": 2}]}]}  # fmt: skip
    with pytest.raises(DeployError, match="num_replicas"):
        apply_overrides(raw, {"replicas": 3})
    # A bundle root is pinned to the version its `latest` names now, so every replica
    # (also ones autoscaling starts later) loads that version.
    root = tmp_path / "bundle"
    (root / "versions" / "abc123").mkdir(parents=True)
    (root / "versions" / "abc123" / "meta.json").write_text("{}")
    (root / "latest").write_text("abc123\n")
    config = apply_overrides(
        load_config(str(REPO / "serve_config.yaml")), {"bundle_uri": str(root)}
    )
    pinned = str(root / "versions" / "abc123")
    assert check_config(config)["mspray"].bundle_uri == pinned
    assert config["applications"][0]["deployments"][0]["user_config"]["bundle_uri"] == pinned
