"""Nightly batch scoring job: ``mspray score`` as a Ray job entrypoint.

    ray job submit --working-dir . -- python ray_jobs/score.py \\
        --bundle s3://models/screws/v3 --input s3://line1/archive/{date}/ \\
        --output s3://line1/scores/{date}/ --workers 8 --maps

Same options as ``mspray score`` (``--help``). ``{date}`` in --input / --output comes from
--date, default today in UTC, so the same command line can sit in a cron table; a rerun of
the same day skips the images already scored. Also runs with plain ``python`` (local Ray).
"""

import sys
from pathlib import Path

# `python ray_jobs/x.py` puts ray_jobs/ on sys.path, not the repository root that
# `ray job submit --working-dir .` uploads: add it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mspray.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["score", *sys.argv[1:]]))
