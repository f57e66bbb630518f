"""Deploy (or update) the mspray Serve application: serve_config.yaml plus setting flags,
through the cluster's Serve REST API, waiting until it is RUNNING.

    ray job submit --working-dir . -- python ray_jobs/deploy.py \\
        --bundle s3://models/screws/v4 --num-gpus 1 --max-replicas 8
    python ray_jobs/deploy.py --address http://head:8265 --bundle s3://models/screws/v5

A new --bundle alone swaps the model in place (user_config), without restarting replicas.
The logic is :mod:`mspray.ray.serve.deploy`; exit code 2 on an invalid config or a
deployment that did not come up.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

# `python ray_jobs/x.py` puts ray_jobs/ on sys.path, not the repository root that
# `ray job submit --working-dir .` uploads: add it.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mspray.ray.serve.deploy import build_parser, run_deploy  # noqa: E402

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = build_parser(default_config=str(REPO / "serve_config.yaml")).parse_args()
    sys.exit(run_deploy(args))
