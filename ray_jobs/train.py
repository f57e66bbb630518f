"""Training job: ``mspray train`` on Ray Train, as a ``ray job submit`` entrypoint.

    ray job submit --working-dir . -- python ray_jobs/train.py \\
        --data s3://datasets/mvtec --category screw --out s3://models/screw/v4 \\
        --workers 4 --use-gpu --storage s3://models/ray-runs --run-name screw-v4

Same options as ``mspray train`` (``--help`` lists them), except that ``--workers``
defaults to 1: a job always trains through Ray Train, so it checkpoints every epoch and
survives worker failures. Submitting again with the same ``--run-name`` and ``--storage``
resumes from the last checkpoint. Inside a job Ray connects to the job's cluster
(``RAY_ADDRESS``); with plain ``python`` a local Ray is started.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `python ray_jobs/x.py` puts ray_jobs/ on sys.path, not the repository root that
# `ray job submit --working-dir .` uploads (and Ray puts on its workers' path): add it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_GLOBAL_FLAGS = ("-q", "--quiet", "-v", "--verbose")


def main(argv: list[str] | None = None) -> int:
    from mspray.cli import main as cli_main

    args = list(sys.argv[1:] if argv is None else argv)
    if not any(a == "--workers" or a.startswith("--workers=") for a in args):
        args = ["--workers", "1", *args]
    # -q/-v belong to the `mspray` parser, before the sub-command.
    flags = [a for a in args if a in _GLOBAL_FLAGS]
    rest = [a for a in args if a not in _GLOBAL_FLAGS]
    return cli_main([*flags, "train", *rest])


if __name__ == "__main__":
    sys.exit(main())
