"""The four MSPBA losses (paper eqs. 1-5), batched.

Per-sample terms are averaged (not summed) so a loss's size does not depend on the batch
size or the number of workers; λ weighs SVDD+Cos against SSL and K-means as in eq. 5.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_EPS = 1e-8


def svdd_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Eq. 1: mean L2 distance between embeddings of neighbouring patches."""
    return _l2(a - b).mean()


def cos_loss(i: torch.Tensor, j: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Eq. 2: mean of cos(i, k) - cos(i, j) over triplets (j near i, k far from i)."""
    return (F.cosine_similarity(i, k, dim=1) - F.cosine_similarity(i, j, dim=1)).mean()


def ssl_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Eq. 3: cross-entropy of the predicted relative angle."""
    return F.cross_entropy(logits, labels)


def kmeans_loss(emb: torch.Tensor, centers: torch.Tensor, relative: bool = False) -> torch.Tensor:
    """Eq. 4: mean distance of each embedding to its nearest (fixed) center.

    Centers are constants between updates; the gradient flows into the embeddings, pulling
    each one towards its nearest center (the public code detached both, so this term never
    trained anything). ``relative`` divides by the embeddings' RMS spread about their mean,
    so that shrinking every embedding towards one point no longer lowers the term.
    """
    loss = _l2_from_sq(sq_dists(emb, centers.to(emb.dtype).detach()).amin(dim=1)).mean()
    return loss / (spread(emb) + _EPS) if relative else loss


def spread(emb: torch.Tensor) -> torch.Tensor:
    """RMS distance of the embeddings ``N×D`` to their mean (falls towards 0 when the
    encoder collapses them to one point)."""
    e = emb.float()
    return (e - e.mean(0)).pow(2).sum(1).mean().sqrt()


def total_loss(terms: dict[str, torch.Tensor], lam: float) -> torch.Tensor:
    """Eq. 5: λ·(L_SVDD + L_Cos) + L_SSL + L_Kmeans over the terms present."""
    zero = next(iter(terms.values())).new_zeros(())
    return (
        lam * (terms.get("svdd", zero) + terms.get("cos", zero))
        + terms.get("ssl", zero)
        + terms.get("kmeans", zero)
    )


def sq_dists(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances ``n×k`` between rows of ``x`` and ``c`` (one matmul)."""
    return (x.pow(2).sum(1, keepdim=True) - 2 * x @ c.T + c.pow(2).sum(1)[None]).clamp(min=0)


def _l2(v: torch.Tensor) -> torch.Tensor:
    return _l2_from_sq(v.pow(2).sum(dim=1))


def _l2_from_sq(sq: torch.Tensor) -> torch.Tensor:
    # sqrt has an infinite gradient at 0; the epsilon keeps identical pairs finite.
    return torch.sqrt(sq.clamp(min=0) + _EPS)
