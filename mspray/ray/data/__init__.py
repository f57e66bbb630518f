"""Ray Data pipelines over the core: bank building, batch scoring, evaluation.

Each module is a thin adapter from an autoscaling Ray Data actor pool
(:func:`mspray.ray.runtime.map_with_detector`, one :class:`~mspray.ray.runtime.DetectorActor`
subclass per stage) to core calls:

- :mod:`~mspray.ray.data.reading`: bounded reads and decoding that turn every bad file into
  an error message instead of an exception.
- :mod:`~mspray.ray.data.banks`: embed training images on actors, per-shard + global
  coreset, write the banks into a bundle (or append to them).
- :mod:`~mspray.ray.data.scoring`: the resumable, streaming scoring job (its output's layout
  is the core's :mod:`mspray.artifacts.output`).
- :mod:`~mspray.ray.data.evaluation`: ``mspray evaluate --ray`` (the core's evaluation on
  actors).

Nothing here is imported by the core.
"""
