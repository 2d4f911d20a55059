"""``lowbit compare PATH --schemes fp32,w8,... [--method rtn,gptq] [--task ...]`` and its outputs
(``--json``, ``--markdown``, ``--plot``). `cli` adds the parser and calls `cmd_compare`."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .comparison import DEFAULT_SCHEMES
from .tasks import VALID_TASKS


def split_labels(values: list[str]) -> tuple[str, ...]:
    """``["fp32,w8", "w4g32"]`` -> ("fp32", "w8", "w4g32"): commas or spaces both separate."""
    return tuple(v for item in values for v in item.split(",") if v)


def add_parser(sub) -> None:
    c = sub.add_parser("compare", help="size, memory, latency and task quality of several schemes vs fp32")
    c.add_argument("path", help="a transformers model folder or an installed model package")
    c.add_argument("--schemes", nargs="+", default=[",".join(DEFAULT_SCHEMES)],
                   help=f"scheme labels, commas or spaces (default {','.join(DEFAULT_SCHEMES)}); "
                        "+emb8 adds row-wise 8-bit embeddings (w4g128+emb8)")
    c.add_argument("--method", default="rtn", help="rtn, gptq, or both: rtn,gptq (gptq needs --calibration)")
    c.add_argument("--task", default="embeddings", help=VALID_TASKS)
    c.add_argument("--text", default=None, help="lm task: UTF-8 text file to score")
    c.add_argument("--context", type=int, default=512, help="lm task: window in tokens (default 512)")
    c.add_argument("--stride", type=int, default=256, help="lm task: tokens between windows (default 256)")
    c.add_argument("--data", default=None, help="classify task: labelled file (TSV label<TAB>text, or .jsonl)")
    c.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="calibration text for gptq and w8a8-static")
    c.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    c.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    c.add_argument("--batch", default="1,64", help="batch sizes timed (default 1,64)")
    c.add_argument("--rounds", type=int, default=5, help="timing rounds (batch 1 gets 6x as many)")
    c.add_argument("--threads", type=int, default=None, help="torch threads (1 gives the steadiest timings)")
    c.add_argument("--no-memory", action="store_true", help="skip the fresh-process RSS probe")
    c.add_argument("--json", dest="json_path", default=None, help="write the report as JSON here")
    c.add_argument("--markdown", default=None, help="write the report as Markdown here")
    c.add_argument("--plot", default=None, help="write the PNG plot here (needs matplotlib)")


def task_options(args: argparse.Namespace) -> dict:
    """The task's options from ``--text/--context/--stride`` (lm) or ``--data`` (classify); a flag
    given for another task is an error. (`lowbit sensitivity` and `lowbit tune` read them too.)"""
    if args.task == "lm":
        return {"text": args.text, "context": args.context, "stride": args.stride}
    if args.task == "classify":
        return {"data": args.data}
    for flag in ("text", "data"):
        if getattr(args, flag) is not None:
            raise ValueError(f"--{flag} applies to --task {'lm' if flag == 'text' else 'classify'}, "
                             f"not {args.task}")
    return {}


def calibration(args: argparse.Namespace, path: str):
    if args.calibration is None:
        return None
    from .calibration import text_batches
    from .models import resolve_model_dir
    import transformers
    tok = transformers.AutoTokenizer.from_pretrained(str(resolve_model_dir(path)))
    return text_batches(tok, args.calibration, samples=args.samples, seq_len=args.seq_len)


def write_outputs(report, json_path=None, markdown=None, plot=None) -> None:
    """Write what was asked for and say where."""
    if json_path:
        report.to_json(json_path)
        print(f"json: {json_path}")
    if markdown:
        Path(markdown).write_text(report.to_markdown(), encoding="utf-8")
        print(f"markdown: {markdown}")
    if plot:
        try:
            print(f"plot: {report.plot(plot)}")
        except ImportError as exc:
            print(f"plot not written: {exc}", file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> int:
    from .comparison import compare
    from .spec import parse
    schemes, methods = split_labels(args.schemes), split_labels([args.method])
    for s in schemes:
        if s != "fp32":
            parse(s.removesuffix("+emb8"))  # a typo fails before the model is loaded
    if args.calibration is None and ("gptq" in methods or any("static" in s for s in schemes)):
        raise ValueError("--method gptq and static schemes need --calibration TEXT_FILE "
                         "(its samples calibrate the layers)")
    batches = tuple(int(b) for b in args.batch.split(","))
    report = compare(args.path, schemes=schemes, method=methods, task=args.task,
                     data=calibration(args, args.path), batch=batches, rounds=args.rounds,
                     threads=args.threads, task_options=task_options(args), memory=not args.no_memory)
    print(report)
    write_outputs(report, args.json_path, args.markdown, args.plot)
    return 0
