"""Calibration data: the batches `lowbit.calibrate.collect` (and ``quantize(..., data=...)``) runs.

Every function returns a list (so progress bars know its length and it can be run twice), and every
random choice comes from a ``torch.Generator`` seeded with ``seed``: the same arguments give the
same batches.

- `batches_from_tensors`: slices of a tensor (or of a dict / tuple of tensors) along dimension 0.
- `text_batches`: tokenized samples of a text file or a list of strings, as dicts of tensors
  (``input_ids``, ``attention_mask``, and ``token_type_ids`` where the tokenizer uses them):

  - ``mode="sentences"``: the text is cut into lines and each line into sentences (after ``.``,
    ``!`` or ``?`` and a space); ``samples`` of them are drawn without replacement and tokenized
    with the tokenizer's special tokens, truncated to ``seq_len``; ``batch_size`` per batch, padded
    to the longest in the batch. With the default ``batch_size=1`` no batch holds padding.
  - ``mode="windows"``: every line is tokenized without special tokens and the ids concatenated;
    ``samples`` distinct start positions are drawn and each window, wrapped in the tokenizer's
    special tokens (``[CLS] ... [SEP]`` for BERT, none for GPT-2), is exactly ``seq_len`` tokens
    (the GPTQ paper's calibration sampling: random fixed-length segments of a corpus).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from .errors import LowbitError

MODES = ("sentences", "windows")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


class CalibrationDataError(LowbitError):
    """Calibration data that cannot make the batches asked for; the message says why."""


def batches_from_tensors(x: "torch.Tensor | Mapping[str, torch.Tensor] | Sequence[torch.Tensor]",
                         batch_size: int) -> list:
    """Split along dimension 0 into batches of ``batch_size`` rows (the last may be shorter).

    A dict of tensors gives dicts (keyword batches), a tuple/list of tensors gives tuples.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationDataError(f"batch_size must be a positive integer, found {batch_size!r}")
    if isinstance(x, torch.Tensor):
        parts = {"": x}
    elif isinstance(x, Mapping):
        parts = dict(x)
    elif isinstance(x, (tuple, list)):
        parts = {str(i): t for i, t in enumerate(x)}
    else:
        raise CalibrationDataError(f"batches_from_tensors takes a Tensor, a dict or a tuple of tensors, "
                                   f"found {type(x).__name__}")
    n = _common_rows(parts)
    starts = range(0, n, batch_size)
    if isinstance(x, torch.Tensor):
        return [x[s:s + batch_size] for s in starts]
    if isinstance(x, Mapping):
        return [{k: t[s:s + batch_size] for k, t in parts.items()} for s in starts]
    return [tuple(t[s:s + batch_size] for t in parts.values()) for s in starts]


def _common_rows(parts: dict[str, Any]) -> int:
    rows = {}
    for k, t in parts.items():
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            found = "a 0-d tensor" if isinstance(t, torch.Tensor) else type(t).__name__
            raise CalibrationDataError(f"entry {k or 'x'!r} must be a tensor with a batch dimension, "
                                       f"found {found}")
        rows[k] = t.shape[0]
    if not rows or len(set(rows.values())) != 1 or 0 in rows.values():
        raise CalibrationDataError(f"the tensors must share a non-zero first dimension, found {rows}")
    return next(iter(rows.values()))


def text_batches(tokenizer: Any, source: "str | os.PathLike | Sequence[str]", samples: int = 128,
                 seq_len: int = 128, seed: int = 0, mode: str = "sentences",
                 batch_size: int = 1) -> list[dict[str, torch.Tensor]]:
    """Seeded, tokenized calibration batches from a text file (a path) or a list of strings."""
    if mode not in MODES:
        raise CalibrationDataError(f"mode must be one of {MODES}, found {mode!r}")
    for name, v in (("samples", samples), ("seq_len", seq_len), ("batch_size", batch_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise CalibrationDataError(f"{name} must be a positive integer, found {v!r}")
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and seq_len > limit:
        raise CalibrationDataError(f"seq_len {seq_len} is longer than the tokenizer's "
                                   f"model_max_length {limit}")
    lines, where = _read_lines(source)
    gen = torch.Generator().manual_seed(seed)
    if mode == "sentences":
        return _sentence_batches(tokenizer, lines, where, samples, seq_len, gen, batch_size)
    return _window_batches(tokenizer, lines, where, samples, seq_len, gen, batch_size)


def _read_lines(source: Any) -> tuple[list[str], str]:
    """Non-blank lines of a file or of a list of strings, and a name for error messages."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise CalibrationDataError(f"calibration text file {str(path)!r} does not exist or is not a file "
                                       "(pass a list of strings for in-memory text)")
        text, where = path.read_text(encoding="utf-8"), str(path)
        lines = text.splitlines()
    elif isinstance(source, Sequence) and all(isinstance(s, str) for s in source):
        lines, where = [ln for s in source for ln in s.splitlines()], "the list of strings"
    else:
        raise CalibrationDataError(f"source must be a path to a text file or a list of strings, "
                                   f"found {type(source).__name__}")
    lines = [ln.strip() for ln in lines if ln.strip()]
    if not lines:
        raise CalibrationDataError(f"{where} holds no text")
    return lines, where


def _sentence_batches(tokenizer: Any, lines: list[str], where: str, samples: int, seq_len: int,
                      gen: torch.Generator, batch_size: int) -> list[dict[str, torch.Tensor]]:
    sentences = [s for ln in lines for s in _SENTENCE_END.split(ln) if s.strip()]
    if samples > len(sentences):
        raise CalibrationDataError(f"asked for {samples} samples but {where} holds {len(sentences)} "
                                   "sentences; lower samples or add text")
    pick = torch.randperm(len(sentences), generator=gen)[:samples].tolist()
    chosen = [sentences[i] for i in pick]
    out = []
    for s in range(0, samples, batch_size):
        enc = tokenizer(chosen[s:s + batch_size], padding=True, truncation=True, max_length=seq_len,
                        return_tensors="pt")
        out.append(dict(enc))
    return out


def _window_batches(tokenizer: Any, lines: list[str], where: str, samples: int, seq_len: int,
                    gen: torch.Generator, batch_size: int) -> list[dict[str, torch.Tensor]]:
    prefix, suffix = _special_template(tokenizer)
    body = seq_len - len(prefix) - len(suffix)
    if body < 1:
        raise CalibrationDataError(f"seq_len {seq_len} leaves no room beside the tokenizer's "
                                   f"{len(prefix) + len(suffix)} special tokens")
    ids = [i for row in tokenizer(lines, add_special_tokens=False)["input_ids"] for i in row]
    starts = len(ids) - body + 1
    if samples > max(starts, 0):
        raise CalibrationDataError(f"asked for {samples} windows of {seq_len} tokens but {where} holds "
                                   f"{len(ids)} tokens ({max(starts, 0)} distinct windows); lower "
                                   "samples or seq_len, or add text")
    pick = torch.randperm(starts, generator=gen)[:samples].tolist()
    flat = torch.tensor(ids, dtype=torch.long)
    rows = [torch.cat([torch.tensor(prefix, dtype=torch.long), flat[p:p + body],
                       torch.tensor(suffix, dtype=torch.long)]) for p in pick]
    out = []
    for s in range(0, samples, batch_size):
        input_ids = torch.stack(rows[s:s + batch_size])  # (batch, seq_len)
        batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if "token_type_ids" in getattr(tokenizer, "model_input_names", ()):
            batch["token_type_ids"] = torch.zeros_like(input_ids)
        out.append(batch)
    return out


def _special_template(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text: found by tokenizing one
    word with and without them (transformers 5 has no public ``build_inputs_with_special_tokens``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    raise CalibrationDataError(f"cannot find where {type(tokenizer).__name__} puts its special tokens "
                               f"({full} vs {plain}); use mode='sentences'")
