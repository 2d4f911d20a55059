"""TableEmbeddingBag against torch.nn.EmbeddingBag on the same dequantized rows; export of a model's
embedding layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.tables import TableEmbeddingBag, TableError, export, open_table

BAG_TOL = 1e-5  # float32 sums of <= 8 rows: only reassociation differences


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.user = torch.nn.Embedding(300, 16)
        self.items = torch.nn.EmbeddingBag(200, 8, mode="sum")
        with torch.no_grad():
            self.user.weight.copy_(torch.randn(300, 16, generator=g))
            self.items.weight.copy_(torch.randn(200, 8, generator=g))
        self.head = torch.nn.Linear(16, 1)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = Tiny()
    return model, export(model, tmp_path_factory.mktemp("x"), bits=8)


def test_export_builds_one_table_per_embedding(exported):
    model, folders = exported
    assert sorted(folders) == ["items", "user"]
    t = open_table(folders["user"])
    assert (t.rows, t.dim, t.layout.bits) == (300, 16, 8)
    assert np.abs(t.lookup(np.arange(300)) - model.user.weight.detach().numpy()).max() < 0.02


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_bag_matches_torch_embedding_bag(exported, mode):
    _, folders = exported
    table = open_table(folders["items"])
    ref = torch.nn.EmbeddingBag.from_pretrained(torch.from_numpy(table.lookup(np.arange(200))), mode=mode)
    keys = torch.tensor([3, 9, 9, 150, 0, 199, 42])
    offsets = torch.tensor([0, 3, 3, 5])  # bags of 3, 0, 2, 2 keys
    bag = TableEmbeddingBag(table, mode=mode)
    assert torch.allclose(bag(keys, offsets), ref(keys, offsets), atol=BAG_TOL)
    two_d = torch.tensor([[1, 2], [3, 4]])
    assert torch.allclose(bag(two_d), ref(two_d), atol=BAG_TOL)
    if mode == "sum":
        w = torch.rand(7, generator=torch.Generator().manual_seed(1))
        assert torch.allclose(bag(keys, offsets, w), ref(keys, offsets, per_sample_weights=w), atol=BAG_TOL)


def test_bag_errors_are_named(exported):
    bag = TableEmbeddingBag(open_table(exported[1]["items"]), mode="mean")
    with pytest.raises(TableError, match="per_sample_weights need mode='sum'"):
        bag(torch.tensor([1, 2]), torch.tensor([0]), torch.ones(2))
    with pytest.raises(TableError, match="not in the table: 200"):
        bag(torch.tensor([1, 200]), torch.tensor([0]))
    with pytest.raises(TableError, match="mode must be one of"):
        TableEmbeddingBag(bag.table, mode="max")


def test_export_without_embeddings_is_an_error(tmp_path):
    with pytest.raises(TableError, match="no nn.Embedding"):
        export(torch.nn.Linear(2, 2), tmp_path / "x")
