"""The CTR pieces: AUC against hand-computed values (ties count half), the config's JSON round trip
and its errors, and the MovieLens-100k split (counts, vocabularies, labels, bags)."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

from lowbit.ctr.model import CTRConfig
from lowbit.ctr.train import auc
from lowbit.errors import LowbitError


def test_auc_hand_computed():
    # positives 0.8, 0.4; negatives 0.4, 0.1: pairs (0.8>0.4) (0.8>0.1) (0.4=0.4: half) (0.4>0.1)
    assert auc(np.array([1, 1, 0, 0]), np.array([0.8, 0.4, 0.4, 0.1])) == pytest.approx(3.5 / 4)
    assert auc(np.array([0, 1]), np.array([0.9, 0.1])) == 0.0
    assert auc(np.array([0, 1, 0, 1]), np.full(4, 0.3)) == 0.5
    with pytest.raises(ValueError, match="both classes; found 2 positives and 0 negatives"):
        auc(np.array([1, 1]), np.array([0.1, 0.2]))


def test_config_round_trip_and_errors():
    c = CTRConfig(sparse=(("user", 10, "sum"), ("genre", 5, "mean")), dense=2, dim=4, bottom=(8, 4))
    assert CTRConfig.from_json(c.to_json()) == c
    with pytest.raises(LowbitError, match="unique, non-empty and differ from 'dense'"):
        CTRConfig(sparse=(("dense", 3, "sum"),), dim=4, bottom=(4,))
    with pytest.raises(LowbitError, match="feature 'user': rows must be a positive int and mode"):
        CTRConfig(sparse=(("user", 3, "max"),), dim=4, bottom=(4,))
    with pytest.raises(LowbitError, match=r"unknown field\(s\) \['width'\]"):
        CTRConfig.from_json({**c.to_json(), "width": 3})
    with pytest.raises(LowbitError, match="CTR config version 7"):
        CTRConfig.from_json({**c.to_json(), "config_version": 7})


def test_movielens_split():
    if importlib.util.find_spec("recbole") is None:
        if os.environ.get("LOWBIT_REQUIRE_REDIS") == "1":
            pytest.fail("recbole==1.2.1 missing (.ci/run installs it with --no-deps)")
        pytest.skip("MovieLens-100k needs recbole==1.2.1: pip install --no-deps recbole==1.2.1")
    from lowbit.ctr import data
    train, test, sizes = data.load()
    assert (len(train), len(test)) == (80_000, 20_000)
    assert sizes == {"user": 944, "item": 1683, "occupation": 22, "genre": 20}
    assert train.label.sum() + test.label.sum() == 55_375  # ratings >= 4 in MovieLens-100k
    keys, offsets = test.sparse["genre"]
    assert offsets.size == len(test) and keys.size > len(test) and keys.max() < sizes["genre"]
    assert test.dense.shape == (20_000, 3) and np.isfinite(test.dense).all()
