"""The service in process (uvicorn on loopback): validation answers 4xx naming the problem, the
request size limit, /health and /metadata, and client parity with in-process inference."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from serve_helpers import SIZES, as_sparse, running, tiny_inputs

QUANT_PROB_BUDGET = 0.01  # 8-bit tables vs the float model: max |probability difference|


@pytest.fixture(scope="module")
def service(served):
    from lowbit.ctr.served import load_served
    from lowbit.serve.app import make_app
    model, folder = served
    served_model, refs = load_served(folder)
    with running(make_app(served_model, refs, str(folder), max_body=20_000)) as url:
        yield model, served_model, url


def post(url, body, raw: bool = False):
    import httpx
    data = body if raw else json.dumps(body)
    r = httpx.post(f"{url}/predict", content=data, headers={"content-type": "application/json"}, timeout=10)
    return r.status_code, r.json()


def test_client_matches_in_process_inference(service):
    from lowbit.serve import Client
    model, served_model, url = service
    inputs = tiny_inputs(32)
    sparse, dense = as_sparse(inputs, model.config)
    with Client(url) as c:
        got = c.predict(inputs)
        assert set(c.last_versions) == set(SIZES)
    want, _ = served_model.predict_versioned(sparse, dense)
    np.testing.assert_array_equal(got.astype(np.float32), want)  # float32 -> JSON -> float64, exact
    with torch.inference_mode():
        ref = torch.sigmoid(model(sparse, dense)).numpy()
    assert np.abs(got - ref).max() < QUANT_PROB_BUDGET
    assert np.abs(got - ref).max() > 0  # the tables really are quantized


@pytest.mark.parametrize("mutate, status, words", [
    (lambda i: i.update(extra=[1] * 4), 422, ["unknown input(s) ['extra']"]),
    (lambda i: i.pop("item"), 422, ["missing input(s) ['item']"]),
    (lambda i: i.update(user=i["user"][:3]), 422, ["one entry per sample", "'user': 3"]),
    (lambda i: i["user"].__setitem__(2, 1.5), 422, ["'user'[2]", "integers", "float 1.5"]),
    (lambda i: i["genre"].__setitem__(1, [2, "x"]), 422, ["'genre'[1][1]", "str 'x'"]),
    (lambda i: i["genre"].__setitem__(0, []), 422, ["'genre'[0]", "1 to 256 keys, found 0"]),
    (lambda i: i["item"].__setitem__(0, SIZES["item"]), 422, [f"key {SIZES['item']} out of range", "0..39"]),
    (lambda i: i["user"].__setitem__(0, -1), 422, ["key -1 out of range"]),
    (lambda i: i["dense"].__setitem__(1, [0.1, 0.2]), 422, ["'dense'[1]", "row of 3 numbers, found 2"]),
    (lambda i: i["dense"][0].__setitem__(2, True), 422, ["'dense'[0][2]", "finite number"]),
    (lambda i: i["dense"][0].__setitem__(0, float("nan")), 422, ["'dense'[0][0]", "nan"]),
])
def test_bad_inputs_get_4xx_naming_the_problem(service, mutate, status, words):
    url = service[2]
    inputs = tiny_inputs(4)
    mutate(inputs)
    code, doc = post(url, {"inputs": inputs})
    assert code == status, doc
    for w in words:
        assert w in doc["error"], (w, doc["error"])


def test_malformed_bodies(service):
    url = service[2]
    assert post(url, b"{not json", raw=True)[0] == 400
    code, doc = post(url, {"input": {}})
    assert code == 422 and '{"inputs"' in doc["error"]
    code, doc = post(url, {"inputs": tiny_inputs(2), "debug": 1})
    assert code == 422 and "'debug'" in doc["error"]


def test_request_size_limit(service):
    url = service[2]
    code, doc = post(url, {"inputs": tiny_inputs(400)})  # ~30 kB > max_body=20,000
    assert code == 413 and "32742 bytes; the limit is 20000" in doc["error"]
    import httpx  # no content-length (chunked): counted while read, refused past the limit
    r = httpx.post(f"{url}/predict", content=iter([b"x" * 8192] * 6), timeout=10)
    assert r.status_code == 413 and "over the limit of 20000 bytes" in r.json()["error"]


def test_health_and_metadata(service):
    import httpx
    from lowbit.serve import Client
    url = service[2]
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    with Client(url) as c:
        c.predict(tiny_inputs(2))
        meta = c.metadata()
    assert sorted(meta["tables"]) == sorted(SIZES)
    user = meta["tables"]["user"]
    assert user["bits"] == 8 and user["store"] == "LocalTable" and user["version_answered"]
    assert user["table"] == "bags.user" and user["url"] == "../tables/bags.user"
    assert meta["inputs"]["item"]["keys"] == f"int in [0, {SIZES['item']})"
    assert meta["model"]["config"]["dim"] == 8 and meta["requests_answered"] >= 1


def test_client_raises_serve_error_with_the_message(service):
    from lowbit.serve import Client, ServeError
    inputs = tiny_inputs(2)
    inputs.pop("dense")
    with Client(service[2]) as c, pytest.raises(ServeError, match="HTTP 422: .*missing input.*'dense'"):
        c.predict(inputs)
