"""Nightly batch scoring job: ``mspray score`` as a Ray job entrypoint.

    ray job submit --working-dir . -- python ray_jobs/score.py \\
        --bundle s3://models/screws/v3 --input s3://line1/archive/{date}/ \\
        --output s3://line1/scores/{date}/ --workers 8 --maps

``{date}`` (and ``{year}``, ``{month}``, ``{day}``) in --input / --output come from --date,
default today in UTC, so the same command line can sit in a cron table. A rerun of the same
day skips the images already scored. Also runs with plain ``python`` (local Ray).
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python ray_jobs/x.py` puts ray_jobs/ on sys.path, not the repository root that
# `ray job submit --working-dir .` uploads (and Ray puts on its workers' path): add it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mspray.ray.data.args import (
    SCORE_DESCRIPTION,
    SCORE_EPILOG,
    add_score_args,
    job_main,
    run_score,
)

if __name__ == "__main__":
    sys.exit(job_main("score.py", SCORE_DESCRIPTION, SCORE_EPILOG, add_score_args, run_score))
