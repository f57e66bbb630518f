"""The run context: what one run of the library shows and which Ray it joins.

``progress`` (progress bars) and ``address`` (the Ray cluster to join) are not settings of
the method and not arguments of each call: an entry point (the CLI's dispatch, a script, a
test) sets them once with :func:`use_run`, and the library reads :func:`current_run`
(Ray Data's ``DataContext.get_current()`` is the precedent). The value lives in a
:class:`contextvars.ContextVar`, so threads and asyncio tasks started inside a ``with
use_run(...)`` see it; Ray processes do not: code that runs remotely receives the
:class:`RunContext` as a value and enters it there.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RunContext:
    """How a run shows itself and where it runs.

    ``progress``: show progress bars (tqdm, Ray Data's). ``address``: the Ray cluster to
    join, or ``"auto"`` for the one ``ray start`` runs on this machine (None: ``$RAY_ADDRESS``,
    else a private local Ray; see :func:`mspray.ray.runtime.init_ray`)."""

    progress: bool = True
    address: str | None = None


# a frozen dataclass: the shared default cannot be changed in place
_CURRENT: contextvars.ContextVar[RunContext] = contextvars.ContextVar(
    "mspray_run",
    default=RunContext(),  # noqa: B039
)


def current_run() -> RunContext:
    """The run context in effect (the defaults outside any :func:`use_run`)."""
    return _CURRENT.get()


@contextmanager
def use_run(ctx: RunContext | None = None, **changes: Any) -> Iterator[RunContext]:
    """Make ``ctx`` (default: the current one) with ``changes`` applied the current run
    context inside the ``with`` block; e.g. ``with use_run(progress=False):`` silences a
    step."""
    new = dataclasses.replace(ctx or current_run(), **changes)
    token = _CURRENT.set(new)
    try:
        yield new
    finally:
        _CURRENT.reset(token)


def progress_bar(iterable: Iterable | None = None, **tqdm_kwargs: Any) -> Any:
    """A tqdm bar, shown when the run context has ``progress`` (and ``disable`` is not
    given true, e.g. on a rank other than 0)."""
    from tqdm.auto import tqdm

    disable = bool(tqdm_kwargs.pop("disable", False)) or not current_run().progress
    return tqdm(iterable, disable=disable, **tqdm_kwargs)
