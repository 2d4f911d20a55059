"""The command line's calibration flags (``lowbit quantize --method gptq --calibration ...``) and
``lowbit eval --task lm`` (perplexity). `cli` adds these to its parsers and calls them."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .algorithms import ALGORITHMS, METHOD_OPTIONS

EVAL_TASKS = ("lm",)


def add_quantize_flags(q: argparse.ArgumentParser) -> None:
    """``--method``, ``--calibration``, ``--samples``, ``--seq-len``, ``--calibration-mode``,
    ``--sequential``, ``--damp`` on the ``quantize`` parser."""
    q.add_argument("--method", default="rtn", choices=sorted(ALGORITHMS),
                   help="rtn (round to nearest) or gptq (needs --calibration)")
    q.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="UTF-8 text file whose tokenized samples calibrate gptq")
    q.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    q.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    q.add_argument("--calibration-mode", default="windows", choices=("windows", "sentences"),
                   help="random fixed-length windows of the text (default) or single sentences")
    q.add_argument("--sequential", action="store_true",
                   help="calibrate and quantize block by block (bounded memory; each block sees the "
                        "quantized blocks before it)")
    q.add_argument("--damp", type=float, default=None,
                   help=f"gptq damping, relative to the mean Hessian diagonal (default "
                        f"{METHOD_OPTIONS['gptq']['damp']})")


def quantize_kwargs(args: argparse.Namespace, tokenizer) -> dict:
    """The `lowbit.quantize` keyword arguments the calibration flags ask for."""
    from .calibration import text_batches
    if args.method == "gptq" and args.calibration is None:
        raise ValueError("--method gptq needs --calibration TEXT_FILE (its samples calibrate the layers)")
    if args.damp is not None and args.method != "gptq":
        raise ValueError(f"--damp is a gptq option; --method is {args.method}")
    kwargs: dict = {"method": args.method, "sequential": args.sequential}
    if args.damp is not None:
        kwargs["method_options"] = {"damp": args.damp}
    if args.calibration is not None:
        kwargs["data"] = text_batches(tokenizer, args.calibration, samples=args.samples,
                                      seq_len=args.seq_len, mode=args.calibration_mode)
    return kwargs


def add_eval_parser(sub) -> None:
    e = sub.add_parser("eval", help="perplexity of a causal LM (lowbit folder, model folder or package)")
    e.add_argument("path", help="a lowbit output folder, a transformers model folder or an installed package")
    e.add_argument("--task", required=True, choices=EVAL_TASKS, help="lm: sliding-window perplexity")
    e.add_argument("--text", required=True, help="UTF-8 text file to score")
    e.add_argument("--context", type=int, default=512, help="window length in tokens (default 512)")
    e.add_argument("--stride", type=int, default=256, help="tokens between window starts (default 256)")
    e.add_argument("--skip", type=int, default=0, help="tokens of the text to leave out at the start")
    e.add_argument("--tokens", type=int, default=None, help="score at most this many tokens after --skip")
    e.add_argument("--threads", type=int, default=None, help="torch threads")


def load_any(path: str):
    """(model, tokenizer, kind): a lowbit folder through `lowbit.load`, else a float model."""
    import transformers
    from .errors import FormatError
    from .io import load, read_header
    from .models import OFFLINE_ENV, load_transformers, resolve_model_dir
    import os
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    try:
        read_header(path)
    except (FormatError, OSError):
        src = resolve_model_dir(path)
        model, tok = load_transformers(src)
        return model, tok, "float"
    return load(path), transformers.AutoTokenizer.from_pretrained(str(path)), "lowbit"


def cmd_eval(args: argparse.Namespace) -> int:
    import torch
    from .eval.perplexity import perplexity
    if args.threads:
        torch.set_num_threads(args.threads)
    text_path = Path(args.text)
    if not text_path.is_file():
        raise ValueError(f"--text {text_path}: not a file")
    model, tok, kind = load_any(args.path)
    ids = torch.tensor(tok(text_path.read_text(encoding="utf-8"))["input_ids"])  # (T,)
    ids = ids[args.skip:] if args.tokens is None else ids[args.skip:args.skip + args.tokens]
    if ids.numel() < 2:
        raise ValueError(f"--text {text_path}: {ids.numel()} tokens after --skip {args.skip}; need 2 or more")
    r = perplexity(model, ids, args.context, args.stride)
    print(f"{args.path} ({kind}): perplexity {r.perplexity:.3f} on {r.tokens} scored tokens of "
          f"{text_path.name} (window {r.context}, stride {r.stride}, {r.windows} windows)")
    sys.stdout.flush()
    return 0
