"""Model zoo: ``create(name, **kw)`` over a timm-like registry.

Example:
    >>> from thrifty.models import create, list_models
    >>> list_models()
    ['cnn1d', 'minilm', 'mlp', 'resnet20', 'tinyllama', 'vit']
    >>> m = create("resnet20", in_chans=1, num_classes=10)
"""
from . import cnn1d as _cnn1d  # noqa: F401  (registers the models)
from . import llama as _llama  # noqa: F401
from . import minilm as _minilm  # noqa: F401
from . import mlp as _mlp  # noqa: F401
from . import resnet as _resnet  # noqa: F401
from . import vit as _vit  # noqa: F401
from .cnn1d import CNN1d
from .minilm import MiniLM, load_sentence_transformer, minilm_path
from .mlp import MLP
from .registry import count_params, create, list_models, model_size_bytes, register_model
from .resnet import BasicBlock, CifarResNet
from .vit import ViT, Block

__all__ = [
    "create", "list_models", "register_model", "count_params", "model_size_bytes",
    "MLP", "CNN1d", "CifarResNet", "BasicBlock", "ViT", "Block", "MiniLM", "minilm_path", "load_sentence_transformer",
]
