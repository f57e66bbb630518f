"""``mspray deploy`` against a head with token authentication (``RAY_AUTH_MODE=token``), as a
user runs it: the CLI in its own process, with the cluster's token in its environment the
way ``ray job submit`` and ``serve deploy`` take it. Without the token the dashboard's
answer is a clear error, not a traceback.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from serve_util import free_port
from test_jobs_e2e import private_head

from mspray.artifacts.bundle import read_meta

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[3]


def _run_deploy(dashboard: str, bundle: str, env: dict[str, str], *extra: str):
    cmd = [
        sys.executable, "-m", "mspray.cli", "deploy", "--config", str(REPO / "serve_config.yaml"),
        "--address", dashboard, "--bundle", bundle, "--device", "cpu", "--num-cpus", "1",
        "--replicas", "1", "--max-replicas", "1", "--timeout", "150",
        "--shared-fs",  # the bundle is on this machine, which is the whole cluster
        *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)


def test_deploy_authenticates_like_rays_clients(tiny_bundle, tmp_path):
    token = secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0")
    with private_head(auth_token=token) as head:
        # token mode off where the client runs: the dashboard refuses, mspray says why
        off = {**env, "RAY_AUTH_MODE": "disabled"}
        denied = _run_deploy(head.dashboard_url, tiny_bundle[0], off)
        assert denied.returncode == 2, denied.stderr
        assert "HTTP 401" in denied.stderr and "RAY_AUTH_MODE=token" in denied.stderr
        # token mode on, but no token here: the same error Ray's clients give
        missing = _run_deploy(head.dashboard_url, tiny_bundle[0], {**env, "HOME": str(tmp_path)})
        assert missing.returncode == 2, missing.stderr
        assert "RAY_AUTH_TOKEN" in missing.stderr
        assert "Traceback" not in denied.stderr + missing.stderr

        env["RAY_AUTH_TOKEN"] = token
        r = _run_deploy(head.dashboard_url, tiny_bundle[0], env, "--http-port", str(free_port()))
        assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout)
    assert result["status"] == {"mspray": "RUNNING"}
    (loaded,) = result["replicas"]["mspray"].values()
    assert loaded == {"default": read_meta(tiny_bundle[0])["version"]}


_COMPARE = """
import json
from ray._private.authentication.http_token_authentication import (
    get_auth_headers_if_auth_enabled,
)
from mspray.ray.serve.deploy import auth_headers
print(json.dumps([get_auth_headers_if_auth_enabled({}), auth_headers()]))
"""


@pytest.mark.parametrize("case", ["env-and-path", "path", "home"])
def test_auth_headers_agree_with_rays_own_helper(case, tmp_path):
    """mspray's header (Ray's helper is private) is Ray's, wherever the token comes from."""
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "token").write_text("  from-path\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token")
    if case == "env-and-path":
        env.update(RAY_AUTH_TOKEN="from-env", RAY_AUTH_TOKEN_PATH=str(tmp_path / "token"))
    elif case == "path":
        env["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "token")
    r = subprocess.run(
        [sys.executable, "-c", _COMPARE], env=env, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rays, ours = json.loads(r.stdout.strip().splitlines()[-1])
    assert {k.lower(): v for k, v in rays.items()} == {k.lower(): v for k, v in ours.items()}
    assert ours
