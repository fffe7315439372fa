"""Models: the ViT with reducer slots, plus architectures whose token reduction is built in.

`get(name)` picks a model class for train.py / eval.py (`config.model_name`, default "vit"). Every model takes
its config as keyword arguments plus `reduce` and `dtype`, is called as `model.apply(params, images, train=...)`
-> (logits, aux), and offers `plan(image_hw)` (per-block static counts) and `flops(image_hw, in_channels)`.
"""
from tokcomp.models import lookupvit, vit

MODELS = {"vit": vit.ViT, "lookupvit": lookupvit.LookupViT}


def get(name: str):
  if name not in MODELS:
    raise ValueError(f"config.model_name={name!r}: must be one of {sorted(MODELS)}")
  return MODELS[name]


__all__ = ["vit", "lookupvit", "get", "MODELS"]
