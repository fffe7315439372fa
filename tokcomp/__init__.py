"""tokcomp: token compression for vision transformers in JAX/Flax, with static shapes throughout."""
from tokcomp import attention, ops, reducers, schedules, tokens
from tokcomp.tokens import Tokens

__version__ = "0.1.0"
__all__ = ["Tokens", "attention", "ops", "reducers", "schedules", "tokens"]
