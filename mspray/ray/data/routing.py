"""Which bundle scores which image in a multi-model scoring run.

Two ways to say it:

- a route template, ``PREFIX/{model}/**``: ``{model}`` is one path segment naming the
  model, ``*`` any text within a segment, ``**`` anything (several segments). A template
  that starts with ``{`` or ``*`` is relative to the input prefix (``{model}/**``).
- a manifest with a ``model`` column (read by :mod:`~mspray.ray.data.inputs`, in Ray Data
  tasks, like any ``--input-manifest``); a relative ``path`` is taken under the input
  prefix.

A path that matches no model (the template does not match, or names a model that was not
given) still gets a row: an error row saying so, like any other bad input.
"""

from __future__ import annotations

import re

from mspray import storage

#: Error text of a path without a model (also how the ``no_model`` metric reason is found).
NO_MODEL = "matches no model"


def route_regex(route: str, input_root: str) -> re.Pattern[str]:
    """The compiled template: ``{model}`` -> a named group of one segment."""
    if "{model}" not in route:
        raise ValueError(f"--route {route!r}: must contain {{model}}, e.g. PREFIX/{{model}}/**")
    first = min(i for i in (route.find("{"), route.find("*")) if i >= 0)
    head, tail = route[:first], route[first:]
    if head:
        # the literal prefix in canonical form (absolute local path / s3://bucket/key)
        canonical = storage.normalize(head)
        sep = storage.separator(canonical)
        head = canonical + sep if head.endswith(("/", sep)) else canonical
    else:
        sep = storage.separator(input_root)
        head = input_root.rstrip("/" + sep) + sep
    seg = r"[^/\\]"
    pattern = re.escape(head)
    for token in re.split(r"(\{model\}|\*\*|\*)", tail):
        if token == "{model}":
            pattern += rf"(?P<model>{seg}+)"
        elif token == "**":
            pattern += ".*"
        elif token == "*":
            pattern += f"{seg}*"
        else:
            pattern += re.escape(token)
    return re.compile(pattern)


def route_paths(paths: list[str], route: str, input_root: str) -> dict[str, str | None]:
    """``path -> model name`` by the route template (``None`` where it does not match; a
    name not in ``models`` is kept, for the error row to say which)."""
    rx = route_regex(route, input_root)
    matches = {p: rx.fullmatch(p) for p in paths}
    return {p: (m.group("model") if m else None) for p, m in matches.items()}


def no_model_error(path: str, model: str | None, known: list[str]) -> str:
    """The ``error`` of a path without a (known) model."""
    named = f" (names {model!r})" if model else ""
    return f"{path}: {NO_MODEL}{named}; models: {', '.join(known)}"
