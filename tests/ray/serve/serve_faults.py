"""Test-only fault injection for Serve replicas: a "GPU" whose model calls fail on demand.

A Serve config of a test uses ``import_path: serve_faults:build_app`` (this directory on
the application's ``runtime_env`` PYTHONPATH). It deploys mspray's detector deployment with
a subclass whose replicas wrap :meth:`mspray.detector.Detector.predict`: while the file named
by ``$MSPRAY_TEST_FAULT_FILE`` exists, every model call raises the error a dead CUDA
context gives. Production code has no switch for this; the file is the test's.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

from mspray.config import ServeConfig, validate
from mspray.ray.serve import app as serve_app

FAULT_FILE = "MSPRAY_TEST_FAULT_FILE"
CUDA_ERROR = "CUDA error: an illegal memory access was encountered (injected by the test)"


def install() -> None:
    """Wrap ``Detector.predict`` in this process (once)."""
    from mspray.detector import Detector

    if getattr(Detector.predict, "fault_injected", False):
        return
    original = Detector.predict

    def predict(self: Any, *args: Any, **kwargs: Any) -> Any:
        flag = os.environ.get(FAULT_FILE)
        if flag and os.path.exists(flag):
            raise RuntimeError(CUDA_ERROR)
        return original(self, *args, **kwargs)

    predict.fault_injected = True  # type: ignore[attr-defined]
    Detector.predict = predict  # type: ignore[method-assign]


class FaultInjectedDetector(serve_app.MSPrayDetector.func_or_class):  # type: ignore[misc,name-defined]
    """mspray's replica, with the fault wrapper installed before anything loads."""

    async def __init__(self, *args: Any, **kwargs: Any) -> None:
        install()
        await super().__init__(*args, **kwargs)


def build_app(args: dict[str, Any] | None = None) -> Any:
    """:func:`mspray.ray.serve.app.build_app` with :class:`FaultInjectedDetector` replicas."""
    cfg = validate(ServeConfig, args or {}, "args")
    options = serve_app.deployment_options(cfg)
    deployment = serve_app.MSPrayDetector.options(func_or_class=FaultInjectedDetector, **options)
    return deployment.bind(cfg.model_dump(), uuid.uuid4().hex[:12])
