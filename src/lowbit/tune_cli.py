"""``lowbit sensitivity``, ``lowbit tune`` and ``lowbit quantize --recipe``: `cli` adds these
parsers and calls these commands.

    lowbit sensitivity PATH --scheme w4g32 [--task embeddings] [--blocks] [--json F] [--markdown F]
    lowbit tune PATH --max-drop 0.01 [--task ...] [--candidates w8,w8a8,w4g128,w4g32,w3g128]
                [--objective bytes|latency] --out recipe.json [--json F] [--markdown F]
    lowbit quantize PATH --recipe recipe.json --out DIR

A task is a `lowbit.tasks` spec (``embeddings``, ``lm``, ``classify``, ``module:function``,
``file.py:function``) with the flags ``lowbit compare`` spells the same way (``--text``,
``--context``, ``--stride`` for lm, ``--data`` for classify). ``--method gptq`` (and ``w8a8-static``
candidates) need ``--calibration TEXT_FILE``; calibration runs once, on the float model.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .compare_cli import task_options
from .spec import VALID_FORMS

DEFAULT_TASK = "embeddings"


def add_parsers(sub) -> None:
    s = sub.add_parser("sensitivity", help="per layer: the task's drop with only that layer quantized")
    s.add_argument("path", help="a folder with config.json, or an installed model package")
    s.add_argument("--scheme", required=True, help=VALID_FORMS)
    s.add_argument("--blocks", action="store_true", help="one repeated block at a time (large models)")
    _common(s)
    t = sub.add_parser("tune", help="per-layer schemes: smallest (or fastest) within --max-drop")
    t.add_argument("path", help="a folder with config.json, or an installed model package")
    t.add_argument("--max-drop", type=float, required=True, help="most task quality to lose (metric units)")
    t.add_argument("--candidates", nargs="+", default=None,
                   help="schemes to choose from, comma- or space-separated (default: w8,w8a8,w4g128,w4g32,w3g128)")
    t.add_argument("--objective", default="bytes", choices=("bytes", "latency"))
    t.add_argument("--rows", type=int, default=None, help="latency: input rows each layer is timed at (default 256)")
    t.add_argument("--out", required=True, help="recipe JSON file to write")
    _common(t)


def _common(p: argparse.ArgumentParser) -> None:
    from .tasks import VALID_TASKS
    p.add_argument("--task", default=DEFAULT_TASK, help=f"{VALID_TASKS} (default embeddings: WordSim-353 Spearman)")
    p.add_argument("--text", default=None, help="lm task: UTF-8 text file to score")
    p.add_argument("--context", type=int, default=512, help="lm task: window in tokens (default 512)")
    p.add_argument("--stride", type=int, default=256, help="lm task: tokens between windows (default 256)")
    p.add_argument("--data", default=None, help="classify task: labelled file (TSV label<TAB>text, or .jsonl)")
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq"), help="gptq needs --calibration")
    p.add_argument("--calibration", default=None, metavar="TEXT_FILE",
                   help="calibration text for gptq and w8a8-static (also feeds the SQNR proxy)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per calibration sample (default 512)")
    p.add_argument("--targets", nargs="+", default=None, help="exact names, class names or re:<regex>")
    p.add_argument("--json", dest="json_path", default=None, help="also write the report as JSON here")
    p.add_argument("--markdown", default=None, help="also write the report as Markdown here")
    p.add_argument("--plot", default=None, help="also write the report as a PNG here (needs matplotlib)")
    p.add_argument("--threads", type=int, default=None, help="torch threads")


def add_recipe_flag(q: argparse.ArgumentParser) -> None:
    q.add_argument("--recipe", default=None, metavar="RECIPE_JSON",
                   help="per-layer schemes from a recipe file (what lowbit tune writes); "
                        "replaces --scheme/--targets/--ignore/--embeddings")


def _load(args: argparse.Namespace):
    """(float model, task, calibration batches or None) for the command's PATH and flags."""
    import torch
    from .models import load_transformers, resolve_model_dir
    from .tasks import resolve_task
    if args.threads:
        torch.set_num_threads(args.threads)
    src = resolve_model_dir(args.path)
    options = task_options(args)  # a misplaced flag fails before the model is loaded
    if args.method == "gptq" and args.calibration is None:
        raise ValueError("--method gptq needs --calibration TEXT_FILE")
    model, tok = load_transformers(src)
    data = None
    if args.calibration is not None:
        from .calibration import text_batches
        data = list(text_batches(tok, args.calibration, samples=args.samples, seq_len=args.seq_len))
    return model, resolve_task(args.task, src, tok, **options), data


def _write_reports(report, args: argparse.Namespace) -> None:
    from .io.atomic import write_file
    for path, text in ((args.json_path, report.to_json), (args.markdown, report.to_markdown)):
        if path:
            write_file(Path(path), lambda tmp, t=text: tmp.write_text(t(), encoding="utf-8"))
            print(f"wrote {path}")
    if args.plot:
        try:
            print(f"plot: {report.plot(args.plot)}")
        except ImportError as exc:
            print(f"plot not written: {exc}", file=sys.stderr)


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .sensitivity import sensitivity
    from .spec import parse
    parse(args.scheme)  # a typo fails before the model is loaded
    model, task, data = _load(args)
    report = sensitivity(model, args.scheme, task, targets=args.targets, data=data, method=args.method,
                         blocks=args.blocks)
    print(report)
    _write_reports(report, args)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .io.atomic import write_file
    from .tune import DEFAULT_CANDIDATES, DEFAULT_ROWS, tune
    candidates = [c for item in (args.candidates or [",".join(DEFAULT_CANDIDATES)])
                  for c in item.split(",") if c]
    out = Path(args.out)
    if out.is_dir():
        raise ValueError(f"--out {out}: is a folder; give the recipe file's name (e.g. recipe.json)")
    model, task, data = _load(args)
    report = tune(model, task, max_drop=args.max_drop, candidates=candidates, objective=args.objective,
                  data=data, targets=args.targets, method=args.method, rows=args.rows or DEFAULT_ROWS)
    print(report)
    recipe = json.dumps(json.loads(report.recipe.to_json()), indent=1, sort_keys=True) + "\n"
    write_file(out, lambda tmp: tmp.write_text(recipe, encoding="utf-8"))
    print(f"wrote {out} (lowbit quantize {args.path} --recipe {out} --out DIR applies it)")
    _write_reports(report, args)
    return 0 if report.within_budget() else 1


def read_recipe(path: str | Path, model):
    """The recipe in ``path``, checked against ``model``: every exact layer name it gives must be a
    module that its rule can quantize (a missing or unquantizable layer is an error naming it)."""
    from .errors import RecipeError
    from .recipe import Recipe, plan
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"--recipe {path}: cannot read it ({exc.strerror})") from None
    try:
        recipe = Recipe.from_json(text)
        the_plan = plan(model, recipe, allow_empty=True)
    except RecipeError as exc:
        raise RecipeError(f"--recipe {path}: {exc}") from None
    named = dict(model.named_modules())
    bad = {t: the_plan.skipped[t] for r in recipe.rules for t in r.targets
           if t in named and t in the_plan.skipped}
    if bad:
        raise RecipeError(f"--recipe {path}: layer(s) that cannot take their rule: " +
                          "; ".join(f"{n}: {why}" for n, why in bad.items()))
    return recipe


def check_recipe_args(args: argparse.Namespace) -> None:
    """--recipe replaces the flags that build a recipe; giving both is an error."""
    given = [f for f, v in (("--scheme", args.scheme), ("--targets", args.targets),
                            ("--ignore", args.ignore), ("--embeddings", args.embeddings)) if v]
    if given:
        raise ValueError(f"--recipe gives every layer's scheme; drop {' '.join(given)}")
    print(f"lowbit quantize: recipe {args.recipe}", file=sys.stderr)
