"""Issue 6 figure: a small CNN trained here on sklearn's bundled 8x8 digits keeps its accuracy
under w8a8-static (int8 weights and calibrated per-tensor int8 inputs, Conv2d and Linear)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import lowbit
from lowbit.nn import QConv2dA8, QLinearA8

datasets = pytest.importorskip("sklearn.datasets", reason="needs scikit-learn (extra 'test')")

MAX_ACCURACY_DROP = 0.01  # the budget: within 1 point of fp32
EPOCHS = 30


def digits():
    d = datasets.load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def cnn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                         nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def train(model, x, y):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(y), generator=g).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


@pytest.fixture(scope="module")
def trained():
    (xtr, ytr), (xte, yte) = digits()
    return train(cnn(), xtr, ytr), (xtr, ytr), (xte, yte)


# measured: fp32 98.49%; minmax, histogram, mse 98.49% (0 lost); percentile 98.24%
@pytest.mark.parametrize("observer", ["minmax", "percentile", "histogram", "mse"])
def test_w8a8_static_cnn_keeps_accuracy(trained, observer):
    model, (xtr, ytr), (xte, yte) = trained
    fp32 = accuracy(model, xte, yte)
    assert fp32 > 0.95  # the float model learned the task
    calib = list(xtr[:512].split(64))
    q = lowbit.quantize(copy.deepcopy(model), lowbit.Recipe((lowbit.Rule(("Conv2d", "Linear"), "w8a8-static"),),
                                                            skip_output_head=False),
                        data=calib, observer=observer, verbose=False)
    assert sum(isinstance(m, (QConv2dA8, QLinearA8)) for m in q.modules()) == 4
    assert fp32 - accuracy(q, xte, yte) <= MAX_ACCURACY_DROP
