"""Tasks: what "quality" means for `lowbit.compare` and `lowbit.tune`.

A task is a callable object that scores a model: ``task(model) -> {metric: value, ...}``. The dict
always holds ``task.metric`` (the primary number) and may hold more (the embeddings task adds
``cos_mean``/``cos_min``, the cosine of each sentence embedding to the fp32 model's). Built in:

- ``embeddings``: Spearman rank correlation between the cosine of the model's embeddings of the
  353 word pairs of WordSim-353 (Finkelstein et al. 2002, the copy gensim ships) and the human
  scores; sentence embeddings are the attention-masked mean of ``last_hidden_state``.
- ``lm``: sliding-window perplexity (`lowbit.eval.perplexity`) of a causal LM on a text file
  (options ``text=``, ``context=`` (512), ``stride=`` (256), ``tokens=`` (all)). Lower is better.
- ``classify``: accuracy of a sequence classifier (``model(**batch).logits`` argmax) on a labelled
  file (option ``data=``), one example a line, either TSV ``label<TAB>text`` or JSONL
  ``{"label": ..., "text": ...}`` (``.jsonl`` files). Labels are class ids, or names the model's
  ``config.label2id`` maps to ids.
- ``module:function`` or ``path/to/file.py:function``: the user's function, called with
  ``(model, tokenizer)`` when it takes two arguments and there is a tokenizer, else ``(model)``;
  it returns a number or a dict holding the metric (the function's ``metric`` attribute or the
  option ``metric=``, default ``"score"``). Higher is better unless the function has the
  attribute ``higher_is_better = False`` or the option ``higher_is_better=False`` is given.
  A module name is imported from the current directory (or the option ``path=``).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch

VALID_TASKS = ("embeddings | lm (text=FILE, context=, stride=) | classify (data=FILE: TSV "
               "label<TAB>text or JSONL) | module:function | path/to/file.py:function")


class TaskError(ValueError):
    pass


class Task(Protocol):
    name: str
    metric: str
    higher_is_better: bool

    def __call__(self, model: torch.nn.Module) -> dict[str, float]: ...


def drop(task: Task, base: float, value: float) -> float:
    """Quality lost going from ``base`` to ``value``: positive means worse, whichever way the
    task's metric points."""
    return (base - value) if task.higher_is_better else (value - base)


@dataclass(frozen=True)
class EmbeddingsTask:
    """WordSim-353 Spearman plus cosine to the fp32 model's sentence embeddings. The reference
    embeddings come from ``reference`` (a float model), or the float model loaded from
    ``model_dir``, computed on the first call and cached in this object."""
    tokenizer: Any
    model_dir: Path | None = None
    reference: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    sentences: tuple[str, ...] = ()
    name: str = "embeddings"
    metric: str = "wordsim_spearman"
    higher_is_better: bool = True
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def reference_embeddings(self) -> torch.Tensor:
        from .eval.embeddings import sentence_embeddings
        if "ref" not in self._cache:
            ref = self.reference
            if ref is None:
                if self.model_dir is None:
                    raise TaskError("the embeddings task needs the float model for its cosine "
                                    "reference: pass model_dir or reference=MODEL")
                from .models import load_transformers
                ref = load_transformers(Path(self.model_dir))[0]
            self._cache["ref"] = sentence_embeddings(ref, self.tokenizer, list(self.sentences))
        return self._cache["ref"]

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        from .eval.embeddings import read_wordsim353, sentence_embeddings, wordsim_spearman
        if "pairs" not in self._cache:
            self._cache["pairs"] = read_wordsim353()
        ref = self.reference_embeddings()
        cos = (sentence_embeddings(model, self.tokenizer, list(self.sentences)) * ref).sum(-1)  # (N,)
        return {self.metric: wordsim_spearman(model, self.tokenizer, self._cache["pairs"]),
                "cos_mean": cos.mean().item(), "cos_min": cos.min().item()}


@dataclass(frozen=True)
class LMTask:
    """Perplexity on ``input_ids`` (T,), windows of ``context`` tokens every ``stride``."""
    input_ids: torch.Tensor = field(repr=False, compare=False)
    context: int = 512
    stride: int = 256
    name: str = "lm"
    metric: str = "perplexity"
    higher_is_better: bool = False

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        from .eval.perplexity import perplexity
        r = perplexity(model, self.input_ids, self.context, self.stride)
        return {self.metric: r.perplexity, "nll_per_token": r.nll_sum / r.tokens}


@dataclass(frozen=True)
class ClassifyTask:
    """Accuracy on ``examples`` ((label, text), ...), ``batch_size`` texts at a time."""
    tokenizer: Any
    examples: tuple[tuple[str, str], ...] = field(repr=False)
    batch_size: int = 32
    name: str = "classify"
    metric: str = "accuracy"
    higher_is_better: bool = True

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        ids = label_ids(model, [lab for lab, _ in self.examples])
        correct = 0
        with torch.inference_mode():
            for i in range(0, len(self.examples), self.batch_size):
                texts = [t for _, t in self.examples[i:i + self.batch_size]]
                batch = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
                out = model(**batch)
                pred = getattr(out, "logits", out).argmax(-1)  # (B,)
                correct += int((pred == ids[i:i + self.batch_size]).sum())
        return {self.metric: correct / len(self.examples)}


def label_ids(model: torch.nn.Module, labels: list[str]) -> torch.Tensor:
    """Labels -> class ids: through ``model.config.label2id`` when it names them, else integers."""
    label2id = getattr(getattr(model, "config", None), "label2id", None) or {}
    out = []
    for lab in labels:
        if lab in label2id:
            out.append(int(label2id[lab]))
        elif lab.lstrip("-").isdigit():
            out.append(int(lab))
        else:
            raise TaskError(f"label {lab!r} is neither a class id nor a name in the model's "
                            f"config.label2id ({sorted(label2id)[:10]})")
    return torch.tensor(out)


def read_labelled(path: Path) -> tuple[tuple[str, str], ...]:
    """TSV ``label<TAB>text`` lines, or JSONL ``{"label": ..., "text": ...}`` for ``.jsonl``."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"classify data {path}: not a file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                out.append((str(row["label"]), str(row["text"])))
            except (ValueError, KeyError, TypeError) as exc:
                raise TaskError(f"{path}:{n}: expected {{\"label\": ..., \"text\": ...}} ({exc})") from None
        else:
            label, tab, text = line.partition("\t")
            if not tab:
                raise TaskError(f"{path}:{n}: expected label<TAB>text, found no tab")
            out.append((label.strip(), text))
    if not out:
        raise TaskError(f"classify data {path}: no examples")
    return tuple(out)


@dataclass(frozen=True)
class UserTask:
    """The user's function as a task (see the module docstring for how it is called)."""
    name: str
    fn: Callable = field(repr=False, compare=False)
    tokenizer: Any = field(default=None, repr=False, compare=False)
    metric: str = "score"
    higher_is_better: bool = True

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        with torch.inference_mode():
            out = self.fn(model, self.tokenizer) if self.wants_tokenizer() else self.fn(model)
        if isinstance(out, dict):
            if self.metric not in out:
                raise TaskError(f"task {self.name}: returned a dict without the metric {self.metric!r} "
                                f"(keys {sorted(out)}); set the function's `metric` attribute")
            return {k: float(v) for k, v in out.items()}
        try:
            return {self.metric: float(out)}
        except (TypeError, ValueError):
            raise TaskError(f"task {self.name}: returned {type(out).__name__}; expected a number "
                            f"or a dict holding {self.metric!r}") from None

    def wants_tokenizer(self) -> bool:
        if self.tokenizer is None:
            return False
        params = [p for p in inspect.signature(self.fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)]
        return len(params) >= 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def load_function(spec: str, path: str | Path | None = None) -> Callable:
    """``module:function`` (imported from ``path`` or the current directory) or
    ``file.py:function`` -> the function."""
    target, _, fname = spec.rpartition(":")
    if not target or not fname.isidentifier():
        raise TaskError(f"task {spec!r}: expected one of {VALID_TASKS}")
    if target.endswith(".py"):
        file = Path(target) if path is None or Path(target).is_absolute() else Path(path) / target
        if not file.is_file():
            raise TaskError(f"task {spec!r}: {file} is not a file")
        mod_spec = importlib.util.spec_from_file_location(f"lowbit_task_{file.stem}", file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        where = str(Path(path or ".").resolve())
        sys.path.insert(0, where)
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise TaskError(f"task {spec!r}: cannot import {target!r} from {where} ({exc})") from None
        finally:
            sys.path.remove(where)
    fn = getattr(module, fname, None)
    if not callable(fn):
        raise TaskError(f"task {spec!r}: {target} has no function {fname!r}")
    return fn


def _tokenizer_for(model_dir: Path | None, tokenizer):
    if tokenizer is not None or model_dir is None:
        return tokenizer
    import transformers
    return transformers.AutoTokenizer.from_pretrained(str(model_dir))


def resolve_task(spec: "str | Task", model_dir: Path | None = None, tokenizer=None, **options) -> Task:
    """A task spec (see the module docstring) -> a Task. ``model_dir`` is the float model's
    folder (the tokenizer and the embeddings task's reference come from it when not given)."""
    if not isinstance(spec, str):
        return spec  # already a task object
    if spec == "embeddings":
        from .eval.sentences import SENTENCES
        tok = _tokenizer_for(model_dir, tokenizer)
        if tok is None:
            raise TaskError("the embeddings task needs a tokenizer (pass tokenizer= or model_dir)")
        _no_extra(spec, options, {"reference", "sentences"})
        return EmbeddingsTask(tok, model_dir, options.get("reference"),
                              tuple(options.get("sentences", SENTENCES)))
    if spec == "lm":
        return _lm_task(_tokenizer_for(model_dir, tokenizer), **options)
    if spec == "classify":
        _no_extra(spec, options, {"data", "batch_size"})
        if options.get("data") is None:
            raise TaskError("the classify task needs data=FILE (TSV label<TAB>text, or JSONL)")
        tok = _tokenizer_for(model_dir, tokenizer)
        if tok is None:
            raise TaskError("the classify task needs a tokenizer (pass tokenizer= or model_dir)")
        return ClassifyTask(tok, read_labelled(options["data"]), int(options.get("batch_size", 32)))
    if ":" not in spec:
        raise TaskError(f"unknown task {spec!r}: expected one of {VALID_TASKS}")
    _no_extra(spec, options, {"path", "metric", "higher_is_better"})
    fn = load_function(spec, options.get("path"))
    higher = options.get("higher_is_better", getattr(fn, "higher_is_better", True))
    return UserTask(spec, fn, _tokenizer_for(model_dir, tokenizer),
                    str(options.get("metric", getattr(fn, "metric", "score"))), bool(higher))


def _lm_task(tokenizer, text=None, context: int = 512, stride: int = 256, tokens: int | None = None,
             **extra) -> LMTask:
    _no_extra("lm", extra, set())
    if text is None:
        raise TaskError("the lm task needs text=FILE (UTF-8 text to score)")
    if tokenizer is None:
        raise TaskError("the lm task needs a tokenizer (pass tokenizer= or model_dir)")
    path = Path(text)
    if not path.is_file():
        raise TaskError(f"lm text {path}: not a file")
    ids = torch.tensor(tokenizer(path.read_text(encoding="utf-8"))["input_ids"])  # (T,)
    ids = ids if tokens is None else ids[:tokens]
    if ids.numel() < 2:
        raise TaskError(f"lm text {path}: {ids.numel()} tokens; need 2 or more")
    return LMTask(ids, int(context), int(stride))


def _no_extra(spec: str, options: dict, allowed: set) -> None:
    extra = sorted(set(options) - allowed)
    if extra:
        raise TaskError(f"task {spec!r} takes no option(s) {extra}; it takes {sorted(allowed) or 'none'}")


__all__ = ["ClassifyTask", "EmbeddingsTask", "LMTask", "Task", "TaskError", "UserTask", "VALID_TASKS",
           "drop", "load_function", "read_labelled", "resolve_task"]
