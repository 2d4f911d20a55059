"""Validating a /predict request body into model inputs. Every problem is an `InputError` whose
message names the input, the position and what was expected; nothing here raises anything else.

Body: ``{"inputs": {"user": [3, 7], "genre": [[1, 4], [2]], "dense": [[0.2, 1.0, 0.9], ...]}}``.
A sparse input is one key per sample (a list of ints) or one bag per sample (a list of lists of
ints, ragged allowed, each non-empty); ``dense`` is (B, width) finite numbers.
"""
from __future__ import annotations

import math

import numpy as np

MAX_BATCH = 4096
MAX_BAG = 256


class InputError(ValueError):
    """A request the model cannot take; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 422) -> None:
        super().__init__(message)
        self.status = status


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def sparse_keys(name: str, value, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """One sparse input -> (keys int64 (n_keys,), offsets int64 (B,)); keys checked in [0, rows)."""
    if not isinstance(value, list) or not value:
        raise InputError(f"input {name!r}: expected a non-empty list (one key or one list of keys per "
                         f"sample), found {type(value).__name__ if value != [] else 'an empty list'}")
    bags = [v if isinstance(v, list) else [v] for v in value]
    keys, offsets = [], []
    for i, bag in enumerate(bags):
        if not bag or len(bag) > MAX_BAG:
            raise InputError(f"input {name!r}[{i}]: a bag needs 1 to {MAX_BAG} keys, found {len(bag)}")
        for j, k in enumerate(bag):
            if not _is_int(k):
                where = f"[{i}]" if not isinstance(value[i], list) else f"[{i}][{j}]"
                raise InputError(f"input {name!r}{where}: keys must be integers, found "
                                 f"{type(k).__name__} {k!r}")
            if not 0 <= k < rows:
                raise InputError(f"input {name!r}: key {k} out of range (valid keys 0..{rows - 1})")
        offsets.append(len(keys))
        keys.extend(bag)
    return np.asarray(keys, np.int64), np.asarray(offsets, np.int64)


def dense_rows(name: str, value, width: int) -> np.ndarray:
    """``dense`` -> float32 (B, width), finite."""
    if not isinstance(value, list) or not value:
        raise InputError(f"input {name!r}: expected a non-empty list of rows of {width} numbers")
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != width:
            found = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise InputError(f"input {name!r}[{i}]: expected a row of {width} numbers, found {found}")
        for j, x in enumerate(row):
            if not (isinstance(x, (int, float)) and not isinstance(x, bool)) or not math.isfinite(x):
                raise InputError(f"input {name!r}[{i}][{j}]: expected a finite number, found {x!r}")
    return np.asarray(value, np.float32)


def parse_request(body, config) -> tuple[dict, np.ndarray]:
    """A decoded JSON body -> (sparse: name -> (keys, offsets), dense (B, width)) for ``config``."""
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), dict):
        raise InputError('body must be a JSON object {"inputs": {name: values}}')
    extra = sorted(set(body) - {"inputs"})
    if extra:
        raise InputError(f"unknown top-level field(s) {extra}; only 'inputs' is accepted")
    inputs = body["inputs"]
    expected = [*config.names, config.dense_name]
    unknown, missing = sorted(set(inputs) - set(expected)), [n for n in expected if n not in inputs]
    if unknown or missing:
        raise InputError(f"unknown input(s) {unknown}, missing input(s) {missing}; the model takes {expected}")
    sizes = {n: len(v) if isinstance(v, list) else None for n, v in inputs.items()}
    if len(set(sizes.values())) != 1:
        raise InputError(f"inputs must have one entry per sample, the same count each; found {sizes}")
    batch = next(iter(sizes.values()))
    if batch is not None and batch > MAX_BATCH:
        raise InputError(f"batch of {batch} samples; at most {MAX_BATCH} per request", status=413)
    sparse = {n: sparse_keys(n, inputs[n], config.rows(n)) for n in config.names}
    return sparse, dense_rows(config.dense_name, inputs[config.dense_name], config.dense)
