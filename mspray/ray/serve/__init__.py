"""Ray Serve deployment of the fused detector (see :mod:`mspray.ray.serve.app`).

``import_path: mspray.ray.serve:build_app`` in a Serve config; ``mspray serve`` on the command
line (:mod:`mspray.ray.serve.run`); ``ray_jobs/deploy.py`` to a cluster
(:mod:`mspray.ray.serve.deploy`). The settings are :class:`mspray.config.ServeConfig`.
"""

from mspray.ray.serve.app import DEPLOYMENT_NAME, MSPrayDetector, build_app, deployment_options

__all__ = ["DEPLOYMENT_NAME", "MSPrayDetector", "build_app", "deployment_options"]
