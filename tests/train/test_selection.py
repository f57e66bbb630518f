"""The synthetic-anomaly selection set: normals never in its bank, enough of them to rank."""

import torch

from mspray.train.selection import COPIES, SelectionSet


def test_training_images_outside_the_selection_bank_join_the_normals():
    g = torch.Generator().manual_seed(0)
    train, val = torch.rand(10, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    sel = SelectionSet.build(train, val, seed=3)
    assert sel.bank_images.shape[0] == 5 and sel.clean.shape[0] == 2 + 5
    assert torch.equal(sel.clean[:2], val)
    as_rows = lambda x: {tuple(r.tolist()) for r in x.flatten(1)[:, :8]}  # noqa: E731
    train_rows, bank_rows, extra_rows = (
        as_rows(train),
        as_rows(sel.bank_images),
        as_rows(sel.clean[2:]),
    )
    assert bank_rows | extra_rows == train_rows and not bank_rows & extra_rows
    assert sel.anomalous.shape[0] == sel.masks.shape[0] == 7 * COPIES
    assert sel.masks.any()


def test_enough_held_out_images_need_no_training_images_as_normals():
    g = torch.Generator().manual_seed(1)
    train, val = torch.rand(40, 3, 16, 16, generator=g), torch.rand(32, 3, 16, 16, generator=g)
    sel = SelectionSet.build(train, val, seed=3)
    assert torch.equal(sel.clean, val) and sel.bank_images.shape[0] == 32
