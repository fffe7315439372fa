"""Models: the ViT with reducer slots."""
from tokcomp.models import vit

__all__ = ["vit"]
