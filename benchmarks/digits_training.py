"""Training for compression on sklearn's 8x8 digits (CPU, about a minute at 1 thread):
fp32 vs post-training RTN vs QAT (STE, LSQ) at 4 and 2 bits per channel, and iPQ with and without
Quant-Noise training at the same compression (>= 10x smaller weight bytes for the quantized layers).

    PYTHONPATH=src python benchmarks/digits_training.py [--epochs 40] [--seeds 0 1 2]

Every number is test accuracy (%) on a fixed split (360 images), mean over seeds.
"""
from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

import lowbit
from lowbit.ipq import Config
from lowbit.ipq_config import LayerGroup

QUANTIZED = ["Conv2d", "Linear"]  # every layer, the output head included
FINETUNE_EPOCHS = 4  # centroid finetuning after each iPQ stage


def data(seed: int = 0):
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(d.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    tr, te = perm[:1437], perm[1437:]
    return (x[tr], y[tr]), (x[te], y[te])


def cnn(seed: int) -> torch.nn.Module:
    """A small CNN (11.4k weights): small enough that 2-bit post-training rounding hurts."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(256, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))


def train(model, train_set, epochs: int, lr: float, seed: int, params=None) -> None:
    x, y = train_set
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params if params is not None else
                           [p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def accuracy(model, test_set) -> float:
    x, y = test_set
    model.eval()
    return 100.0 * (model(x).argmax(1) == y).float().mean().item()


def ipq_config() -> Config:
    """Stages fc1 -> conv2 -> head, blocks of 8 inputs: fc1 (256 -> 32) 128 centroids, conv2
    (8*9 = 72 columns) 16, the head 8; float16 centroids. conv1 (72 weights) stays float."""
    return Config((LayerGroup("fc", ("6",), (), 8, 128), LayerGroup("conv", ("2",), (), 8, 16),
                   LayerGroup("head", ("8",), (), 8, 8)), seed=0, n_iter=25)


def run_seed(seed: int, epochs: int, sets) -> dict[str, float]:
    tr, te = sets
    out = {}
    base = cnn(seed)
    train(base, tr, epochs, 3e-3, seed)
    out["fp32"] = accuracy(base, te)
    for bits in (4, 2):
        scheme = f"w{bits}"
        out[f"rtn w{bits}"] = accuracy(lowbit.quantize(copy.deepcopy(base), scheme, targets=QUANTIZED,
                                                       verbose=False), te)
        for lsq in (False, True):
            q = lowbit.qat.prepare(copy.deepcopy(base), scheme, targets=QUANTIZED, learn_scale=lsq)
            train(q, tr, max(epochs // 2, 1), 1e-3, seed + 1)
            lowbit.qat.convert(q)
            out[f"qat{'-lsq' if lsq else ''} w{bits}"] = accuracy(q, te)
    for noisy in (False, True):
        m = cnn(seed)
        if noisy:
            handle = lowbit.quant_noise(m, p=0.1, block_size=8, ignore=("0",))
        train(m, tr, epochs, 3e-3, seed)
        if noisy:
            handle.remove()
        tag = "ipq+noise" if noisy else "ipq"
        q = lowbit.ipq.quantize(copy.deepcopy(m), ipq_config(), verbose=False)
        out[tag] = accuracy(q, te)

        def finetune(model):
            cents = [p for n, p in model.named_parameters() if n.endswith("centroids")]
            train(model, tr, FINETUNE_EPOCHS, 1e-3, seed + 2, params=cents)
        q = lowbit.ipq.quantize(copy.deepcopy(m), ipq_config(), finetune=finetune, verbose=False)
        out[f"{tag} +centroid ft"] = accuracy(q, te)
        rep = lowbit.ipq.size_report(q)
        fq, sq = rep.total("codebook")
        out["ipq weight ratio"] = fq / sq
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cpu = subprocess.run("lscpu | grep 'Model name'", shell=True, capture_output=True, text=True).stdout.strip()
    print(f"# digits training for compression; {cpu}; {platform.python_version()}, torch "
          f"{torch.__version__}, {args.threads} thread(s); epochs {args.epochs}; seeds {args.seeds}")
    t0 = time.perf_counter()
    sets = data()
    runs = [run_seed(s, args.epochs, sets) for s in args.seeds]
    print(f"{'method':<24}{'mean acc %':>11}{'min':>8}{'max':>8}{'vs fp32':>9}")
    fp = statistics.mean(r["fp32"] for r in runs)
    for key in runs[0]:
        vals = [r[key] for r in runs]
        if key.endswith("ratio"):
            print(f"{key:<24}{statistics.mean(vals):>10.1f}x")
            continue
        m = statistics.mean(vals)
        print(f"{key:<24}{m:>11.2f}{min(vals):>8.2f}{max(vals):>8.2f}{m - fp:>+9.2f}")
    print(f"# wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
