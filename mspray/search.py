"""Nearest-neighbour search helpers shared by the banks and the coreset."""

from __future__ import annotations

import faiss
import torch


def sync_faiss_threads() -> None:
    """Give faiss's OpenMP pool torch's thread count.

    faiss ships its own OpenMP runtime, which defaults to every core of the machine; inside a
    Ray worker (or with ``torch.set_num_threads``) that oversubscribes the CPUs it was given.
    """
    n = torch.get_num_threads()
    if faiss.omp_get_max_threads() != n:
        faiss.omp_set_num_threads(n)
