"""Deploy (or update) the mspray Serve application: ``mspray deploy`` as a Ray job entrypoint.

    ray job submit --working-dir . -- python ray_jobs/deploy.py \\
        --bundle s3://models/screws/v4 --num-gpus 1 --max-replicas 8
    python ray_jobs/deploy.py --address http://head:8265 --bundle s3://models/screws/v5

Same options as ``mspray deploy`` (``--help``), with the repository's serve_config.yaml as
the default ``--config``. A new --bundle alone swaps the model in place (user_config),
without restarting replicas. Exit code 2 on an invalid config or a deployment that did not
come up.
"""

import sys
from pathlib import Path

# `python ray_jobs/x.py` puts ray_jobs/ on sys.path, not the repository root that
# `ray job submit --working-dir .` uploads: add it.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mspray.cli import main  # noqa: E402

if __name__ == "__main__":
    # a later --config on the command line wins over this default
    sys.exit(main(["deploy", "--config", str(REPO / "serve_config.yaml"), *sys.argv[1:]]))
