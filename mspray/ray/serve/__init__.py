"""Ray Serve deployment of the fused detector (see :mod:`mspray.ray.serve.app`).

``import_path: mspray.ray.serve:build_app`` in a Serve config; ``mspray serve`` on the command
line.
"""

from mspray.ray.serve.app import DEPLOYMENT_NAME, AppArgs, MSPrayDetector, ServeSettings, build_app

__all__ = ["DEPLOYMENT_NAME", "AppArgs", "MSPrayDetector", "ServeSettings", "build_app"]
