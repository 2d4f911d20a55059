"""Train the CTR model on MovieLens-100k, export its embedding tables at ``--bits`` (greedy range),
and save the served model (dense part + table references). Then serve it with ``lowbit serve``.

    python examples/ctr/train_and_save.py ctr-out --bits 4
    lowbit serve ctr-out/model --port 8080
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from lowbit import tables
from lowbit.ctr import data, train
from lowbit.ctr.served import save_served


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--bits", type=int, default=4, choices=[32, 16, 8, 4, 2])
    p.add_argument("--epochs", type=int, default=train.EPOCHS)
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    train_split, test, sizes = data.load()
    model = train.train(train_split, sizes, epochs=args.epochs, log=print)
    print(f"in-process test AUC: {train.auc(test.label, train.predict(model, test)):.4f}")
    made = tables.export(model, out / "tables", bits=args.bits, range_method="greedy", overwrite=True)
    refs = {name.split(".", 1)[1]: {"table": f.name, "url": f"../tables/{f.name}"} for name, f in made.items()}
    save_served(model, out / "model", refs)
    print(f"saved {out / 'model'} with {args.bits}-bit tables in {out / 'tables'}; serve it with:\n"
          f"  lowbit serve {out / 'model'} --port 8080")


if __name__ == "__main__":
    main()
