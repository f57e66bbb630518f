import torch

from mspray.train.kmeans import LocalComm, assign, fit_centers, kmeans_plus_plus, lloyd_step


def _blobs(n_per=200, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])[:k]
    x = torch.cat([m + 0.5 * torch.randn(n_per, 2, generator=g) for m in means])
    return x, means


def test_recovers_well_separated_clusters():
    x, means = _blobs()
    c = fit_centers(x, 4, 20, LocalComm(), seed=0)
    d = torch.cdist(means, c).amin(1)
    assert (d < 0.2).all(), d


def test_lloyd_step_is_the_mean_of_assigned_points():
    x = torch.tensor([[0.0], [1.0], [9.0], [11.0]])
    c = torch.tensor([[0.0], [10.0], [100.0]])
    new = lloyd_step(x, c, LocalComm())
    assert torch.allclose(new, torch.tensor([[0.5], [10.0], [100.0]]))  # empty keeps place


def test_kmeans_pp_spreads_centers_and_handles_tiny_inputs():
    x, _ = _blobs()
    c = kmeans_plus_plus(x, 4, torch.Generator().manual_seed(1))
    assert len(set(assign(x, c).tolist())) == 4
    tiny = torch.ones(2, 3)
    assert kmeans_plus_plus(tiny, 5, torch.Generator().manual_seed(0)).shape == (5, 3)


def test_sums_and_counts_all_reduce_equals_union():
    # Lloyd on two shards with summed statistics == Lloyd on the union.
    x, _ = _blobs(seed=3)
    c0 = kmeans_plus_plus(x, 4, torch.Generator().manual_seed(0))
    full = lloyd_step(x, c0, LocalComm())
    a, b = x[::2], x[1::2]

    class Half(LocalComm):
        """Worker holding shard ``a``; its all-reduce adds the other shard's statistics."""

        def __init__(self, other):
            self.other = other

        def all_reduce_sum(self, t):
            k = c0.shape[0]
            if t.dim() == 1:
                return t + torch.bincount(assign(self.other, c0), minlength=k).to(t.dtype)
            return t + torch.zeros_like(c0).index_add_(0, assign(self.other, c0), self.other)

    assert torch.allclose(lloyd_step(a, c0, Half(b)), full, atol=1e-5)
