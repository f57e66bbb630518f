"""Ray Serve deployment of the fused detector (see :mod:`mspray.serve.app`).

``import_path: mspray.serve:build_app`` in a Serve config; ``mspray serve`` on the command
line.
"""

from mspray.serve.app import DEPLOYMENT_NAME, AppArgs, MSPrayDetector, ServeSettings, build_app

__all__ = ["DEPLOYMENT_NAME", "AppArgs", "MSPrayDetector", "ServeSettings", "build_app"]
