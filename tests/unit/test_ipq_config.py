"""iPQ config: validation with clear errors, JSON round trip, YAML loading."""
from __future__ import annotations

import pytest

from lowbit.ipq_config import IPQConfig, IPQConfigError, LayerGroup

YAML = """
version: 1
seed: 3
n_iter: 15
groups:
  - name: ffn
    targets: ["re:.*\\\\.(intermediate|output)\\\\.dense"]
    block_size: 8
    n_centroids: 256
  - name: attn
    targets: [query, key, value]
    ignore: ["re:.*\\\\.0\\\\..*"]
    block_size: 4
    n_centroids: 512
    centroid_dtype: float32
"""


def config() -> IPQConfig:
    return IPQConfig((LayerGroup("ffn", "re:.*dense", block_size=8, n_centroids=256),
                      LayerGroup("emb", ("Embedding",), ("lm_head",), 4, 128, "float32")),
                     seed=7, n_iter=10, tol=1e-4)


def test_json_round_trip():
    c = config()
    assert IPQConfig.from_json(c.to_json()) == c
    assert c.groups[0].targets == ("re:.*dense",)  # a single name is not split into characters


def test_from_yaml_text_and_file(tmp_path):
    c = IPQConfig.from_yaml(YAML)
    assert [g.name for g in c.groups] == ["ffn", "attn"]
    assert c.groups[0].targets == (r"re:.*\.(intermediate|output)\.dense",)
    assert c.groups[1] == LayerGroup("attn", ("query", "key", "value"), (r"re:.*\.0\..*",), 4, 512,
                                     "float32")
    assert (c.seed, c.n_iter, c.init, c.tol) == (3, 15, "kmeans++", None)
    path = tmp_path / "ipq.yaml"
    path.write_text(YAML)
    assert IPQConfig.from_yaml(path) == c == IPQConfig.from_yaml(str(path))
    assert IPQConfig.from_json(c.to_json()) == c


@pytest.mark.parametrize("change,message", [
    ({"block_size": 0}, "group 'ffn': block_size must be a positive integer, found 0"),
    ({"n_centroids": 70000}, r"group 'ffn': n_centroids must be an integer in 2..65536, found 70000"),
    ({"n_centroids": 1.5}, "n_centroids must be an integer"),
    ({"centroid_dtype": "bfloat16"}, r"centroid_dtype must be one of \('float16', 'float32'\)"),
    ({"targets": ["re:("]}, "group 'ffn': bad regex in target 're:\\('"),
    ({"targets": []}, "needs at least one target"),
])
def test_group_validation(change, message):
    d = dict(name="ffn", targets=["Linear"], **{k: v for k, v in change.items() if k != "targets"})
    if "targets" in change:
        d["targets"] = change["targets"]
    with pytest.raises(IPQConfigError, match=message):
        LayerGroup.from_dict(d)


def test_config_validation():
    g = LayerGroup("a", "Linear")
    with pytest.raises(IPQConfigError, match=r"duplicates \['a'\]"):
        IPQConfig((g, g))
    with pytest.raises(IPQConfigError, match="init must be one of"):
        IPQConfig((g,), init="kmeans")
    with pytest.raises(IPQConfigError, match="version 2 is not supported"):
        IPQConfig((g,), version=2)
    with pytest.raises(IPQConfigError, match=r"unknown fields \['stages'\]; valid:"):
        IPQConfig.from_dict({"stages": []})
    with pytest.raises(IPQConfigError, match=r"group 'a': unknown fields \['bits'\]"):
        IPQConfig.from_dict({"groups": [{"name": "a", "targets": ["x"], "bits": 3}]})
    with pytest.raises(IPQConfigError, match="does not exist"):
        IPQConfig.from_yaml("no_such_ipq.yaml")
    with pytest.raises(IPQConfigError, match="not valid YAML"):
        IPQConfig.from_yaml("groups: [\n  - name: a")


def test_layer_seed_depends_only_on_config_stage_and_layer():
    c = config()
    seeds = {c.layer_seed(s, l) for s in range(3) for l in range(50)}
    assert len(seeds) == 150
    assert c.layer_seed(1, 2) == IPQConfig.from_json(c.to_json()).layer_seed(1, 2)
