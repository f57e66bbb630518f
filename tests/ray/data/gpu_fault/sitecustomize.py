"""Test-only fault injection, never imported by mspray: a "GPU" whose CUDA context breaks.

``tests/ray/data/test_device_faults.py`` puts this folder on the ``PYTHONPATH`` of a
simulated cluster's workers (with ``MSPRAY_TEST_GPU_FAULT`` naming a shared folder), so
Python imports it at every worker's start. It wraps ``Detector.predict``: the first model
call of an actor that reserved a GPU (once per cluster: a marker file) breaks that process
for good, as an illegal memory access does to a CUDA context, and every later call of the
process fails the same way. Every call is logged as ``<pid> ok|fail``. While the shared
folder holds a file ``every``, every model call on a GPU actor fails instead, with that
file's text as the error.
"""

import os

_STATE = os.environ.get("MSPRAY_TEST_GPU_FAULT")

if _STATE:
    import mspray.detector as _detector

    _predict = _detector.Detector.predict
    _broken = False

    def _on_gpu() -> bool:
        import ray

        return bool(ray.get_runtime_context().get_accelerator_ids().get("GPU"))

    def predict(self, images, timings=None):  # noqa: ANN001, ANN201
        global _broken
        every = os.path.join(_STATE, "every")
        if os.path.exists(every) and _on_gpu():
            with open(os.path.join(_STATE, "calls.log"), "a") as log:
                log.write(f"{os.getpid()} fail\n")
            with open(every) as f:
                raise RuntimeError(f.read())
        if not _broken and _on_gpu():
            try:
                os.close(os.open(os.path.join(_STATE, "fired"), os.O_CREAT | os.O_EXCL))
                _broken = True
            except FileExistsError:
                pass
        with open(os.path.join(_STATE, "calls.log"), "a") as log:
            log.write(f"{os.getpid()} {'fail' if _broken else 'ok'}\n")
        if _broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")
        return _predict(self, images, timings)

    _detector.Detector.predict = predict
