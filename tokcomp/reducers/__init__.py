"""Reducer registry: config strings such as "tome:r=13" or "evit:keep=0.7,layers=3-6-9" -> a schedule.

A method registers a `Method`: its config dataclass, the pure `reduce(tokens, signals, *, config)`, the
signals it reads from attention, how to spread its arguments over the blocks, and its static count rule.
A learned method registers a linen `module` instead of `reduce`: a Module class with a `config` field whose
`__call__(tokens, signals, *, train)` has the reducer signature. The block instantiates it under the method's
name, so its parameters live beside the block's (`encoderblock_3/dynamicvit/...`). In training it may keep
the full length and set `Tokens.policy`, and it may `sow` scalar loss terms into the "losses" collection,
which train.py adds to the objective.
`reducers.names()` drives the contract tests, so every registered method is tested for jit-once, batch > 1,
odd N, finite outputs and its declared count.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable

from tokcomp import schedules
from tokcomp.attention import Signals
from tokcomp.tokens import Tokens

ReduceFn = Callable[..., Tokens]


@dataclasses.dataclass(frozen=True)
class Method:
  name: str
  reduce: ReduceFn | None                       # reduce(tokens, signals, *, config) -> tokens
  signals: tuple[str, ...]                      # what the block's attention must compute
  build: Callable[[dict[str, Any], int], schedules.Schedule]  # parsed args, depth -> per-block steps
  out_count: Callable[[Any, int, int], int]     # config, N, protected -> N'
  resolve: Callable[[Any, int, int], Any] = lambda config, n, p: config  # adapt to N, or None for identity
  prop_attn: Callable[[Any], bool] = lambda config: False  # ask for log(size) in later attention
  example: str = ""                             # a small valid config string for the contract tests
  module: Any = None                            # learned: a linen Module class, Module(config=...)(tokens,
  #                                               signals, train=...) -> tokens; `reduce` is then None
  bind: Callable[[Any, int, int], Any] = lambda config, n0, p: config  # see the model's input count N0 first
  export: Callable[..., Any] | None = None       # after training: export(params, model, workdir, image_hw)
  flops: Callable[[Any, int, int, int], float] | None = None  # own FLOPs (config, n in, protected, width):
  #                                               learned layers that `schedules.vit_flops` cannot see (STViT)
  attn_sparsity: Callable[[Any], float | None] = lambda config: None  # an attention change of EVERY block of
  #                                               the model (GTP-ViT's θ < 1, `attention.sparsify_probs`); None: none

  def __post_init__(self):
    if (self.reduce is None) == (self.module is None):
      raise ValueError(f"reducer {self.name!r}: give exactly one of reduce (training-free) or module (learned)")


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
  if method.name in _REGISTRY:
    raise ValueError(f"reducer {method.name!r} is already registered")
  _REGISTRY[method.name] = method
  return method


def get(name: str) -> Method:
  if name not in _REGISTRY:
    raise ValueError(f"unknown reducer {name!r}; registered: {', '.join(names())}")
  return _REGISTRY[name]


def names() -> list[str]:
  return sorted(_REGISTRY)


def parse_args(spec: str) -> tuple[str, dict[str, Any]]:
  """"evit:keep=0.7,layers=3-6-9" -> ("evit", {"keep": 0.7, "layers": "3-6-9"}). Values are Python literals
  where they parse as one, else strings."""
  name, _, rest = spec.strip().partition(":")
  args: dict[str, Any] = {}
  for item in filter(None, (t.strip() for t in _split_top(rest))):
    key, eq, value = item.partition("=")
    if not eq:
      raise ValueError(f"reducer spec {spec!r}: argument {item!r} must be key=value")
    try:
      args[key.strip()] = ast.literal_eval(value.strip())
    except (ValueError, SyntaxError):
      args[key.strip()] = value.strip()
  return name.strip(), args


def _split_top(s: str) -> list[str]:
  """Splits on commas that are not inside brackets, so "r=(8, -0.5)" stays one argument."""
  out, depth, cur = [], 0, ""
  for ch in s:
    depth += 1 if ch in "([" else -1 if ch in ")]" else 0
    if ch == "," and depth == 0:
      out.append(cur)
      cur = ""
    else:
      cur += ch
  return out + [cur]


def build_schedule(spec: str | schedules.Schedule | None, depth: int) -> schedules.Schedule:
  """A config string (methods joined by '+', each on its own blocks), a ready schedule, or None -> schedule."""
  if spec is None or (isinstance(spec, str) and spec.strip() in ("", "none", "dense")):
    return (None,) * depth
  if isinstance(spec, tuple):
    if len(spec) != depth:
      raise ValueError(f"schedule has {len(spec)} entries: must have one per block, depth={depth}")
    return spec
  steps: list = [None] * depth
  for part in spec.split("+"):
    name, args = parse_args(part)
    for i, step in enumerate(get(name).build(args, depth)):
      if step is None:
        continue
      if steps[i] is not None:
        raise ValueError(f"reducer spec {spec!r}: block {i} gets both {steps[i].method} and {step.method}")
      steps[i] = step
  return tuple(steps)


def apply(step: schedules.Step, tokens: Tokens, signals: Signals) -> Tokens:
  method = get(step.method)
  if method.module is not None:
    raise ValueError(f"{step.method} is a learned reducer (a linen module with parameters): run it inside a model, "
                     f"or through reducers.module(step)")
  return method.reduce(tokens, signals, config=step.config)


def module(step: schedules.Step, name: str | None = None):
  """The linen module of a learned step (unbound; init and apply it, or call it inside a parent module)."""
  method = get(step.method)
  if method.module is None:
    raise ValueError(f"{step.method} is training-free: use reducers.apply")
  return method.module(config=step.config, name=name)


def is_learned(step: schedules.Step | None) -> bool:
  return step is not None and get(step.method).module is not None


def needed_signals(step: schedules.Step | None) -> tuple[str, ...]:
  return () if step is None else get(step.method).signals


def attention_sparsity(steps: schedules.Schedule) -> float | None:
  """The attention sparsity the schedule's methods declare (`Method.attn_sparsity`) for every block of the
  model, or None. Steps that declare different values are a ValueError."""
  found = {(s.method, v) for s in steps if s is not None
           for v in [get(s.method).attn_sparsity(s.config)] if v is not None}
  if len({v for _, v in found}) > 1:
    raise ValueError(f"schedule declares different attention sparsities {sorted(found)}: one value applies to "
                     "every block")
  return next(iter(found))[1] if found else None


def check_args(method: str, args: dict[str, Any], allowed: dict[str, Any]) -> dict[str, Any]:
  """Fills defaults and rejects unknown argument names, naming the valid ones."""
  unknown = set(args) - set(allowed)
  if unknown:
    raise ValueError(f"{method}: unknown argument(s) {sorted(unknown)}; valid: {sorted(allowed)}")
  return {**allowed, **args}


def _import_methods() -> None:
  """Imports every module in this package; each method module registers itself (one method per file)."""
  import importlib
  import pkgutil
  for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
    importlib.import_module(f"{__name__}.{info.name}")


_import_methods()
