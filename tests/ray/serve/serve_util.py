"""Helpers shared by the Serve tests (the shared fixtures are in ``conftest.py`` here)."""

from __future__ import annotations

import socket
from typing import Any


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deploy_apps(raw: dict[str, Any], blocking: bool = True) -> None:
    """What ``serve deploy serve_config.yaml`` does: validate, then apply the config."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(raw), _blocking=blocking)
