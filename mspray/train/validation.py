"""Loss-based validation on held-out normal images (monitoring, and ``selection=loss``).

``val_score`` is a scale-free version of eq. 5 on a fixed draw:
λ·(SVDD / spread + L_Cos) + L_SSL + Kmeans / spread, where ``spread`` is the RMS distance of
the validation embeddings to their mean and the K-means centers are refit on the current
validation embeddings (same seed each epoch). Rescaling the embeddings leaves it unchanged.
It cannot rank epochs when the SSL term stays at chance (random init): the distance terms
then fall when the embeddings collapse, so the score can improve while detection gets
worse. Selection uses synthetic anomalies by default (:mod:`mspray.train.selection`).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mspray.train import losses, sampling
from mspray.train.kmeans import fit_centers, reduce_sum


@torch.no_grad()
def loss_validation(self: Any, images: torch.Tensor) -> dict[str, float]:
    """Validation terms and the loss-based selection score of ``self`` (a
    :class:`~mspray.train.loop.ScaleTrainer`) on held-out normal images (normalised).

    A fixed draw (same patches every epoch). Returns ``val_<term>`` for each loss,
    ``val_ssl_acc``, ``val_spread`` and ``val_score`` (see the module docstring).
    Collective: every rank must call it, with or without local images.
    """
    self.core.eval()
    enc = self.core.encoder
    d = enc.embed_dim
    n_local = images.shape[0]
    n = n_local * self.t.samples_per_image
    s: dict[str, sampling.Samples] = {}
    if n_local:
        g = torch.Generator().manual_seed(self.t.seed + 12_345 + self.comm.rank)
        s = self.draw(n_local, n, *images.shape[-2:], g)
    bs = max(1, self.t.batch_size)

    def embed(name: str) -> list[torch.Tensor]:
        """Embeddings ``n×D`` of each patch position of sample kind ``name``."""
        if name not in s:
            return []
        out = []
        for pos in s[name].pos:
            chunks = [
                enc.embed_patches(
                    sampling.crop(images, s[name].img[i : i + bs], pos[i : i + bs], self.scale)
                ).float()
                for i in range(0, n, bs)
            ]
            out.append(torch.cat(chunks) if chunks else images.new_zeros((0, d)))
        return out

    want = set(self.t.losses)
    near, ssl, km = embed("near"), embed("ssl"), embed("kmeans")
    everything = torch.cat([*near, *ssl, *km]) if n else images.new_zeros((0, d)).float()
    # Local sums, all-reduced in one collective: count, svdd, cos, ssl CE, ssl correct,
    # number of embeddings, sum of squared norms, then the D-vector sum of embeddings.
    v = torch.zeros(7 + d, dtype=torch.float64, device=images.device)
    v[0] = n
    if near and "svdd" in want:
        v[1] = losses.svdd_loss(near[0], near[1]).double() * n
    if near and "cos" in want:
        v[2] = losses.cos_loss(near[0], near[1], near[2]).double() * n
    if ssl:
        logits = self.core.head(ssl[0], ssl[1])
        labels = s["ssl"].labels.to(logits.device)
        v[3] = losses.ssl_loss(logits, labels).double() * n
        v[4] = (logits.argmax(1) == labels).sum()
    v[5] = everything.shape[0]
    v[6] = everything.double().pow(2).sum()
    v[7:] = everything.double().sum(0)
    tot = reduce_sum(self.comm, v)
    count, n_emb = float(tot[0]), float(tot[5])
    if count == 0:
        return {"val_score": math.nan}
    mean = tot[7:] / n_emb
    spread = math.sqrt(max(float(tot[6] / n_emb - mean.pow(2).sum()), 0.0)) + 1e-12
    out = {"val_spread": spread}
    if "svdd" in want:
        out["val_svdd"] = float(tot[1]) / count
    if "cos" in want:
        out["val_cos"] = float(tot[2]) / count
    if "ssl" in want:
        out["val_ssl"] = float(tot[3]) / count
        out["val_ssl_acc"] = float(tot[4]) / count
    if "kmeans" in want:
        # Centers of the current validation embeddings (fixed seed): the term measures
        # how clustered they are now, not how far they drifted from stale centers.
        x = km[0] if km else images.new_zeros((0, d)).float()
        centers = fit_centers(
            x, self.t.n_centers, self.t.kmeans_iters, self.comm, seed=self.t.seed + 99
        )
        part = torch.tensor(
            [float(losses.kmeans_loss(x, centers).double() * x.shape[0]) if len(x) else 0.0],
            dtype=torch.float64,
        )
        out["val_kmeans"] = float(reduce_sum(self.comm, part)[0]) / count
    score = self.t.lam * (out.get("val_svdd", 0.0) / spread + out.get("val_cos", 0.0))
    score += out.get("val_ssl", 0.0) + out.get("val_kmeans", 0.0) / spread
    out["val_score"] = score
    return out
