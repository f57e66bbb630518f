"""Training job: ``mspray train`` on Ray Train, as a ``ray job submit`` entrypoint.

    ray job submit --working-dir . -- python ray_jobs/train.py \\
        --data s3://datasets/mvtec --category screw --out s3://models/screw/v4 \\
        --workers 4 --use-gpu --storage s3://models/ray-runs --run-name screw-v4

Same options as ``mspray train`` (``--help``), except that ``--workers`` defaults to 1: a
job always trains through Ray Train, so it checkpoints every epoch and survives worker
failures. Submitting again with the same ``--run-name`` and ``--storage`` resumes.
"""

import sys
from pathlib import Path

# `python ray_jobs/x.py` puts ray_jobs/ on sys.path, not the repository root that
# `ray job submit --working-dir .` uploads: add it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mspray.cli import main  # noqa: E402


def job_args(argv: list[str]) -> list[str]:
    """``mspray train`` arguments of the job: ``--workers 1`` unless given."""
    given = any(a == "--workers" or a.startswith("--workers=") for a in argv)
    return ["train", *([] if given else ["--workers", "1"]), *argv]


if __name__ == "__main__":
    sys.exit(main(job_args(sys.argv[1:])))
