"""All of mspray's Ray code: thin adapters from Ray to the core (which imports no Ray).

- :mod:`mspray.ray.runtime`: start or connect Ray once, actor-pool options, and the
  detector actor that every Ray Data stage builds on.
- :mod:`mspray.ray.train`: Ray Train (DDP) adapter over the core training loop.
- :mod:`mspray.ray.data`: Ray Data pipelines: bank building, batch scoring, evaluation.
- :mod:`mspray.ray.serve`: the Ray Serve application (HTTP endpoint).
"""
