import torch
import torch.nn.functional as F

from mspray.train import losses


def test_kmeans_loss_has_a_gradient_that_pulls_towards_the_nearest_center():
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
    emb = torch.tensor([[1.0, 1.0], [9.0, -2.0]], requires_grad=True)
    loss = losses.kmeans_loss(emb, centers)
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    # A gradient step moves each embedding towards its own nearest center.
    moved = emb.detach() - 0.1 * emb.grad
    before = torch.cdist(emb.detach(), centers).amin(1)
    after = torch.cdist(moved, centers).amin(1)
    assert (after < before).all()
    expected = (torch.tensor([2.0]).sqrt() + torch.tensor([5.0]).sqrt()) / 2
    assert torch.allclose(loss, expected, atol=1e-5)


def test_kmeans_loss_through_an_encoder_trains_its_weights():
    lin = torch.nn.Linear(4, 2)
    losses.kmeans_loss(lin(torch.randn(8, 4)), torch.randn(3, 2)).backward()
    assert lin.weight.grad.abs().sum() > 0


def test_svdd_cos_ssl_values():
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    b = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    assert torch.allclose(losses.svdd_loss(a, b), torch.tensor(2.5), atol=1e-4)
    i = torch.tensor([[1.0, 0.0]])
    j = torch.tensor([[1.0, 0.1]])
    k = torch.tensor([[0.0, 1.0]])
    want = F.cosine_similarity(i, k) - F.cosine_similarity(i, j)
    assert torch.allclose(losses.cos_loss(i, j, k), want.mean())
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]])
    assert losses.ssl_loss(logits, torch.tensor([0, 1])) < 0.01


def test_identical_pairs_have_finite_gradients():
    a = torch.ones(4, 3, requires_grad=True)
    losses.svdd_loss(a, a.detach()).backward()
    assert torch.isfinite(a.grad).all()


def test_total_loss_weights_svdd_and_cos_by_lambda():
    t = {
        "svdd": torch.tensor(2.0),
        "cos": torch.tensor(1.0),
        "ssl": torch.tensor(0.5),
        "kmeans": torch.tensor(0.25),
    }
    assert torch.isclose(losses.total_loss(t, 1e-3), torch.tensor(1e-3 * 3 + 0.75))
    assert torch.isclose(losses.total_loss({"ssl": torch.tensor(1.0)}, 1e-3), torch.tensor(1.0))
