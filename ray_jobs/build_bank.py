"""Bank building job: ``mspray build-bank`` as a Ray job entrypoint.

    ray job submit --working-dir . -- python ray_jobs/build_bank.py \\
        --bundle s3://models/screw/v4 --data mvtec:s3://datasets/mvtec --category screw \\
        --workers 8

Same options as ``mspray build-bank`` (``--help``): embeds the normal images on a Ray Data
actor pool and writes the banks (and the recalibrated threshold) into the bundle. Pair it
with ``ray_jobs/train.py --no-banks`` so the banks are not built on the job's driver.
"""

import sys
from pathlib import Path

# `python ray_jobs/x.py` puts ray_jobs/ on sys.path, not the repository root that
# `ray job submit --working-dir .` uploads: add it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mspray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["build-bank", *sys.argv[1:]]))
