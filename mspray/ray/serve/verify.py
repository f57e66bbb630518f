"""Confirm a rollout replica by replica: every replica serves the bundle versions asked for.

Every replica reports its ``/healthz`` answer (which version each served name is pinned to
for this deploy and which versions it has loaded) at each health check and change of
models, to the application's shared actor (:mod:`mspray.ray.serve.pins`), and any replica
answers ``GET /v1/replicas`` with all of them. So :func:`verify_replicas` needs one replica
to answer, whichever one Serve's proxy routes to: its locality routing (same node, then
same zone) cannot hide the others. It polls until every replica (the RUNNING ones the
Serve REST API lists, when given) serves the versions the requested bundles name. It needs
Serve's HTTP proxy, which the caller may not reach: from outside the cluster often only the
dashboard (port 8265) is open. Then :func:`verify_through_dashboard` runs the same check as
a Ray job, submitted through the dashboard's Job API, on the head node, where the proxy
listens, and reads its answer from the job's logs (``python -m mspray.ray.serve.verify`` is
that job).
"""

from __future__ import annotations

import json
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

#: The job's answer is the log line starting with this.
ANSWER = "mspray-verify: "


class VerifyError(RuntimeError):
    """The replicas did not all come to serve the requested versions."""


def expected_versions(models: dict[str, str]) -> dict[str, str]:
    """Name -> the version id each bundle URI stands for now."""
    from mspray.artifacts.bundle import read_meta

    return {name: read_meta(uri)["version"] for name, uri in models.items()}


def serves(health: dict[str, Any], models: dict[str, str], versions: dict[str, str]) -> bool:
    """Whether one replica's ``/healthz`` answer serves ``models`` at ``versions``: the names
    configured as asked, each pinned to its expected version, and every loaded model at it
    (a single model must be loaded)."""
    if health.get("status") != "ok" or health.get("models") != models:
        return False
    loaded, pinned = health.get("loaded") or {}, health.get("pinned") or {}
    if any(pinned.get(n) != v for n, v in versions.items()):
        return False
    if len(models) == 1 and not loaded:
        return False
    return all(versions.get(n) == v for n, v in loaded.items())


def verify_replicas(
    endpoint: str,
    n_replicas: int,
    models: dict[str, str],
    timeout: float,
    poll_s: float = 0.5,
    replica_ids: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Poll ``GET endpoint/v1/replicas`` (every replica's report, from any replica) until
    the replicas ``replica_ids`` (when given: the RUNNING ones Serve lists), else any
    ``n_replicas`` distinct replicas, serve ``models`` (name -> bundle URI) at the versions
    those URIs name now (see :func:`serves`). A replica whose change to them failed (it
    still serves its previous models) raises :class:`VerifyError` naming what still serves
    and the error. Returns replica id -> its report."""
    import requests

    versions = expected_versions(models)
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer = requests.get(endpoint.rstrip("/") + "/v1/replicas", timeout=10).json()
            reports: dict[str, dict[str, Any]] = answer["replicas"]
        except (requests.RequestException, ValueError, KeyError, TypeError) as e:
            reports, answer = {}, {"status": f"unreachable or not mspray: {e}"}
        required = list(replica_ids) if replica_ids else sorted(reports)
        for rid in required:
            health = reports.get(rid) or {}
            if health.get("last_reload_error") and health.get("requested") == models:
                raise VerifyError(
                    f"replica {rid} failed to swap to {models}: "
                    f"{health['last_reload_error']}; it still serves {health.get('models')} "
                    f"(versions {health.get('loaded')})"
                )
        seen = {r: reports[r] for r in required if serves(reports.get(r) or {}, models, versions)}
        if len(seen) >= (len(replica_ids) if replica_ids else n_replicas):
            return seen
        if time.monotonic() > deadline:
            missing = [r for r in required if r not in seen]
            raise VerifyError(
                f"after {timeout:.0f}s {len(seen)} of {n_replicas} replicas serve {models} "
                f"at versions {versions}; not (yet): "
                f"{ {r: reports.get(r, 'no report') for r in missing} or answer }"
            )
        time.sleep(poll_s)


def reachable(url: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``url``'s host and port opens from here."""
    parts = urlsplit(url)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        with socket.create_connection((parts.hostname or "", port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def verify_through_dashboard(
    dashboard: str,
    endpoint: str,
    n_replicas: int,
    models: dict[str, str],
    timeout: float,
    runtime_env: dict[str, Any] | None = None,
    replica_ids: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """:func:`verify_replicas` run as a Ray job submitted through the dashboard at
    ``dashboard``, against ``endpoint`` as seen from the head node. ``runtime_env`` is the
    application's (so the job imports the same mspray)."""
    from ray.job_submission import JobSubmissionClient

    request = {
        "endpoint": endpoint,
        "replicas": n_replicas,
        "models": models,
        "timeout": timeout,
        "replica_ids": replica_ids,
    }
    client = JobSubmissionClient(dashboard)
    job = client.submit_job(
        entrypoint=f"python -m mspray.ray.serve.verify '{json.dumps(request)}'",
        runtime_env=runtime_env or None,
        entrypoint_num_cpus=0,
    )
    deadline = time.monotonic() + timeout + 120  # the job's own start-up on top
    while not (status := client.get_job_status(job)).is_terminal():
        if time.monotonic() > deadline:
            client.stop_job(job)
            raise VerifyError(f"the verification job {job} did not finish in time")
        time.sleep(1.0)
    logs = client.get_job_logs(job)
    answers = [line[len(ANSWER) :] for line in logs.splitlines() if line.startswith(ANSWER)]
    if not answers:
        raise VerifyError(f"the verification job {job} ended {status.value}: {logs[-2000:]}")
    answer = json.loads(answers[-1])
    if answer.get("error"):
        raise VerifyError(answer["error"])
    return answer["replicas"]


def main(argv: list[str] | None = None) -> int:
    """The verification job: one JSON argument (endpoint, replicas, models, timeout);
    prints the answer as one line after :data:`ANSWER`. Exit 0 confirmed, 2 not."""
    request = json.loads((argv if argv is not None else sys.argv[1:])[0])
    try:
        replicas = verify_replicas(
            request["endpoint"],
            request["replicas"],
            request["models"],
            request["timeout"],
            replica_ids=request.get("replica_ids"),
        )
    except VerifyError as e:
        print(ANSWER + json.dumps({"error": str(e)}), flush=True)
        return 2
    print(ANSWER + json.dumps({"replicas": replicas}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
