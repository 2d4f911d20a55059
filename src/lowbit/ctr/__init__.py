"""A DLRM-style CTR model on MovieLens-100k, served from quantized embedding tables
(`lowbit demo ctr`, `lowbit serve`). Nothing happens at import.

    from lowbit.ctr import data, train
    train_split, test, sizes = data.load()
    model = train.train(train_split, sizes)
"""
from .model import DLRM, CTRConfig
from .served import load_served, rebind, save_served

__all__ = ["CTRConfig", "DLRM", "load_served", "rebind", "save_served"]
