"""Bank building job: ``mspray build-bank`` as a Ray job entrypoint.

    ray job submit --working-dir . -- python ray_jobs/build_bank.py \\
        --bundle s3://models/screws/v3 --data mvtec:s3://data/mvtec --category screw \\
        --workers 4

Add ``--append --data folder:PATH`` to add new normal images to the existing banks without
retraining. Also runs with plain ``python`` (local Ray).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python ray_jobs/x.py` puts ray_jobs/ on sys.path, not the repository root that
# `ray job submit --working-dir .` uploads (and Ray puts on its workers' path): add it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mspray.ray.data.args import (
    BUILD_BANK_DESCRIPTION,
    BUILD_BANK_EPILOG,
    add_build_bank_args,
    job_main,
    run_build_bank,
)

if __name__ == "__main__":
    sys.exit(
        job_main(
            "build_bank.py",
            BUILD_BANK_DESCRIPTION,
            BUILD_BANK_EPILOG,
            add_build_bank_args,
            run_build_bank,
        )
    )
