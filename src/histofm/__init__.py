"""histofm: foundation models for computational pathology.

>>> import histofm
>>> model = histofm.create_model("vit_small_patch16_224")
>>> histofm.list_models("vit_*")[:2]
['vit_base_patch16_224', 'vit_base_patch8_224']
"""

from histofm._version import __version__
from histofm.errors import HistofmError
from histofm.registry import ModelInfo, create_model, list_models, load_checkpoint, model_info, register_model


def tokenize(texts, model=None, **kwargs):  # noqa: ANN001, ANN003, ANN201
    """Token ids ``(B, L)`` of ``texts`` as vision-language model ``model`` expects them (see ``histofm.data.tokenizer``)."""
    from histofm.data.tokenizer import tokenize as _tokenize

    return _tokenize(texts, model, **kwargs)


def eval_transform(name: str):  # noqa: ANN201
    """The model's own preprocessing (resize, crop, normalise) as a torchvision transform."""
    from histofm.data.transforms import eval_transform_for

    return eval_transform_for(model_info(name))


__all__ = [
    "HistofmError",
    "ModelInfo",
    "__version__",
    "create_model",
    "eval_transform",
    "list_models",
    "load_checkpoint",
    "model_info",
    "register_model",
    "tokenize",
]
