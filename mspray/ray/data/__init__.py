"""Ray Data pipelines over the core: bank building, batch scoring, evaluation.

Each module is a thin adapter from a Ray Data actor pool to core calls:

- :mod:`~mspray.ray.runtime`: start/connect Ray, size the actor pool, load the
  detector once per actor.
- :mod:`~mspray.ray.data.reading`: bounded reads and decoding that turn every bad file into
  an error message instead of an exception.
- :mod:`~mspray.ray.data.banks`: embed training images on actors, per-shard + global
  coreset, write the banks into a bundle (or append to them).
- :mod:`~mspray.ray.data.results`: the on-disk layout of scoring output (Parquet parts named
  by a hash of their paths, heatmaps, run summaries) and how a rerun finds what is done.
- :mod:`~mspray.ray.data.scoring`: the resumable, streaming scoring job.
- :mod:`~mspray.ray.data.evaluation`: the metrics JSON of ``mspray evaluate`` over Ray Data.
- :mod:`~mspray.ray.data.args`: command-line options shared by ``mspray`` and ``ray_jobs/``.

Nothing here is imported by the core.
"""
