r"""Issue 9 on one accelerator: tokcomp (JAX) against timm (PyTorch, SDPA, eager and torch.compile) and the
official ToMe patch on timm, in one run; writes accelerator.json and accelerator.md.

  python benchmarks/accelerator.py --tome_repo .refs/ToMe --diffrate_rates .refs/DiffRate/compression_rate.json \
      [--models S,B,L] [--batches 1,64,256] [--reducers tome8,tome13,tome16,evit,diffrate] [--train|--no-train] \
      [--parts jax,torch] [--torch_python PY] [--runs 30] [--warmup 5] [--out benchmarks/accelerator]
  python benchmarks/accelerator.py --merge A/accelerator.json B/part_torch.json --out DIR   (fold partial runs)
  python benchmarks/accelerator.py --smoke ...   tiny models (depth 2, width 64, 64 px) on CPU: tests, not numbers

The parent runs each part as a child process (same process group), one after the other, so JAX and PyTorch never
hold the device at once: `--part jax` (tokcomp) and `--part torch` (timm; `--torch_python` picks its interpreter).
Each child writes part_<name>.json; the parent folds them into accelerator.{json,md} under --out.

What each row is (224 px, ViT-S/B/L 16, bf16, random weights and images: timing does not depend on them):
  tokcomp          `vit.make(variant, dtype=bfloat16)`, params cast to bf16, bf16 images; dense and each reducer:
                   tome8/13/16 "tome:r=N"; evit "evit:keep=0.7" at blocks 3-6-9 (EViT's 4th, 7th and 10th of
                   12; ours for ViT-L: 6-12-18); diffrate: the authors' searched schedule from --diffrate_rates
                   (ViT-S-DeiT, ViT-B-DeiT, ViT-L-MAE), the entry whose FLOPs are nearest ToMe r=13's (r=8's for
                   ViT-L). Timed as `tokcomp.bench.time_models`: lower+compile once (compile s), warm up, then
                   the rows of one model and batch called round-robin, `block_until_ready` per call; img/s =
                   batch / median call time. Peak MiB: XLA memory_analysis of the row's executable (argument +
                   output + temp - alias bytes; `bench.memory_bytes`). On GPU the JSON also keeps the process's
                   `memory_stats()["peak_bytes_in_use"]` after each model and batch: cumulative (it cannot be
                   reset), so not a per-row number.
  tokcomp train    one optax AdamW step on softmax CE (fp32 params, bf16 compute), jitted with params and
                   optimiser state donated, batch --train_batch (128): dense, ToMe r=13, EViT 0.7, for S and B.
  timm sdpa eager  `timm.create_model("vit_{small,base,large}_patch16_224")`, eval, `torch.inference_mode`,
                   bf16 by `model.to(torch.bfloat16)` (--torch_bf16 cast) or autocast; fused SDPA attention
                   is asserted on.
  timm sdpa compiled  the same module under `torch.compile(model, dynamic=False)` (one per batch size, so no
                   dynamic-shape recompile); compile s = its first call, with inductor's caches disabled
                   (TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 unless set): a cold compile, as on the JAX side.
  timm + official ToMe  `tome.patch.timm(model); model.r = r` on its own copy, eager, imported at run time from
                   --tome_repo (never copied here). ToMe's patch replaces timm's attention with its own
                   non-fused attention (it needs the keys and the size bias), as in the official code.
  Torch timing: `torch.cuda.synchronize()` around each call; peak MiB = `max_memory_allocated` during one call
  (after `reset_peak_memory_stats`) minus what was allocated before it, plus the row's own weight and input bytes,
  so that other models resident in the process do not count.

Derived columns: GFLOPs are analytic (`ViT.flops`), per image; official ToMe rows count with tokcomp's ToMe (the
same count rule, parity-tested). FLOP ratio = GFLOPs(baseline) / GFLOPs(row); speedup = img/s(row) /
img/s(baseline); the baseline is the dense row of the same model, batch and kind: tokcomp dense for tokcomp rows,
tokcomp dense train step for train rows, timm eager dense for every torch row.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MODELS = {"S": "S/16", "B": "B/16", "L": "L/16"}
TIMM_NAMES = {"S": "vit_small_patch16_224", "B": "vit_base_patch16_224", "L": "vit_large_patch16_224"}
REDUCERS = ("tome8", "tome13", "tome16", "evit", "diffrate")
DEFAULT_REDUCERS = {"S": REDUCERS, "B": REDUCERS, "L": ("tome8", "evit", "diffrate")}
TOME_R = {"tome8": 8, "tome13": 13, "tome16": 16}
DIFFRATE_MODELS = {"S": "ViT-S-DeiT", "B": "ViT-B-DeiT", "L": "ViT-L-MAE"}  # the authors' entries
DIFFRATE_NEAR = {"S": "tome13", "B": "tome13", "L": "tome8"}  # pick the schedule entry nearest this row's FLOPs
EVIT_LAYERS = {"S": "3-6-9", "B": "3-6-9", "L": "6-12-18"}
TRAIN_MODELS, TRAIN_REDUCERS = ("S", "B"), ("tome13", "evit")
IMAGE_SIZE = 224

# --smoke: one tiny ViT for every model key, and reducer settings that fit its 17 tokens and 2 blocks.
SMOKE_VIT = dict(width=64, depth=2, mlp_dim=256, num_heads=2, patch=16)
SMOKE_IMAGE_SIZE = 64
SMOKE_TOME_R = {"tome8": 2, "tome13": 3, "tome16": 4}
SMOKE_EVIT = "evit:keep=0.7,layers=1"
SMOKE_DIFFRATE = "diffrate:prune=15-11,merge=13-9"

JAX, JAX_TRAIN = "tokcomp", "tokcomp train"
EAGER, COMPILED, OFFICIAL_TOME = "timm sdpa eager", "timm sdpa compiled", "timm + official ToMe"
IMPL_ORDER = (JAX, EAGER, COMPILED, OFFICIAL_TOME, JAX_TRAIN)
REDUCER_ORDER = ("dense",) + REDUCERS
LABELS = {"dense": "dense", "tome8": "ToMe r=8", "tome13": "ToMe r=13", "tome16": "ToMe r=16",
          "evit": "EViT 0.7", "diffrate": "DiffRate"}
SMOKE_NOTE = "SMOKE (not a measurement): tiny models, a handful of runs"


# ---------------------------------------------------------------------------------------------------------------
# Settings shared by the parts (no jax or torch imports here: the torch part runs without jax).

def model_name(model: str, smoke: bool) -> str:
  w = SMOKE_VIT
  return (f"ViT-{MODELS[model]} (smoke: depth {w['depth']}, width {w['width']}, {SMOKE_IMAGE_SIZE} px)" if smoke
          else f"ViT-{MODELS[model]}")


def image_size(smoke: bool) -> int:
  return SMOKE_IMAGE_SIZE if smoke else IMAGE_SIZE


def tome_spec(key: str, smoke: bool) -> str:
  return f"tome:r={(SMOKE_TOME_R if smoke else TOME_R)[key]}"


def reducer_spec(model: str, key: str, smoke: bool, diffrate_rates: str | None = None) -> str | None:
  """tokcomp's config string for a row (None: dense). DiffRate's needs --diffrate_rates (a ValueError without)."""
  if key == "dense":
    return None
  if key in TOME_R:
    return tome_spec(key, smoke)
  if key == "evit":
    return SMOKE_EVIT if smoke else f"evit:keep=0.7,layers={EVIT_LAYERS[model]}"
  if key == "diffrate":
    if smoke:
      return SMOKE_DIFFRATE
    if not diffrate_rates:
      raise ValueError("diffrate rows need --diffrate_rates (the authors' compression_rate.json)")
    return diffrate_spec(model, diffrate_rates)
  raise ValueError(f"reducer {key!r}: must be one of {REDUCERS}")


def diffrate_spec(model: str, path: str) -> str:
  """The authors' schedule for `model` whose FLOPs are nearest the ToMe row named in DIFFRATE_NEAR."""
  if "," in path or "+" in path:
    raise ValueError(f"--diffrate_rates {path!r}: the path must not contain ',' or '+'")
  with open(path) as f:
    entries = json.load(f)[DIFFRATE_MODELS[model]]
  target = flops_and_tokens(model, tome_spec(DIFFRATE_NEAR[model], False), False)[0]
  specs = [f"diffrate:schedule={path},model={DIFFRATE_MODELS[model]},flops={k}" for k in entries]
  return min(specs, key=lambda s: abs(flops_and_tokens(model, s, False)[0] - target))


def label(key: str, spec: str | None) -> str:
  """The table's name for a reducer; DiffRate's names the authors' schedule entry it uses."""
  if key == "diffrate" and spec and "schedule=" in spec:
    fields = dict(f.split("=", 1) for f in spec.split(":", 1)[1].split(","))
    return f"DiffRate ({fields['model']} {fields['flops']})"
  return LABELS[key]


def jax_model(model: str, smoke: bool, **kwargs):
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from tokcomp.models import vit
  if smoke:
    w = SMOKE_VIT
    return vit.ViT(width=w["width"], depth=w["depth"], mlp_dim=w["mlp_dim"], num_heads=w["num_heads"],
                   patch_size=(w["patch"], w["patch"]), num_classes=1000, **kwargs)
  return vit.make(MODELS[model], num_classes=1000, **kwargs)


def flops_and_tokens(model: str, spec: str | None, smoke: bool) -> tuple[float, list[int]]:
  """Analytic GFLOPs per image and the token count entering each block's MLP, from tokcomp's plan."""
  m = jax_model(model, smoke, reduce=spec)
  hw = (image_size(smoke),) * 2
  return m.flops(hw) / 1e9, [c.n_mlp for c in m.plan(hw)[1]]


def nvidia_driver() -> str | None:
  if not shutil.which("nvidia-smi"):
    return None
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError) as e:
    return f"nvidia-smi failed: {e}"
  return out.stdout.strip() or f"nvidia-smi rc={out.returncode}: {out.stderr.strip()[:200]}"


def now() -> str:
  return datetime.datetime.now().isoformat(timespec="seconds")


def row(impl: str, kind: str, model: str, key: str, batch: int, args, **fields) -> dict:
  """One row; measured fields go in `fields`, status 'ok' unless a reason is given."""
  base = dict(impl=impl, framework="torch" if impl in (EAGER, COMPILED, OFFICIAL_TOME) else "jax", kind=kind,
              model=model, model_name=model_name(model, args.smoke), reducer=key, label=LABELS[key], batch=batch,
              image_size=image_size(args.smoke), smoke=args.smoke, status="ok", reason=None)
  base.update(fields)
  return base


def skipped(impl: str, kind: str, model: str, key: str, batch: int, args, reason: str) -> dict:
  return row(impl, kind, model, key, batch, args, status="skipped", reason=reason)


# ---------------------------------------------------------------------------------------------------------------
# --part jax

def run_jax(args) -> dict:
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  import flax
  import jax
  import jax.numpy as jnp
  import jaxlib
  import optax

  from tokcomp import bench

  env = dict(part="jax", device=bench.device_name(), platform=jax.devices()[0].platform, jax=jax.__version__,
             jaxlib=jaxlib.__version__, flax=flax.__version__, optax=optax.__version__, driver=nvidia_driver(),
             host=platform.node(), started=now(), run=args.run_id, attn_impl=args.attn_impl,
             dtype="bfloat16 compute, bfloat16 params and images (train: fp32 params, bf16 compute)")
  rows, device_peaks = [], []
  hw = image_size(args.smoke)
  attn_impl = None if args.attn_impl == "default" else args.attn_impl
  for model in args.models:
    specs, keys = {"dense": None}, ["dense"]
    for key in args.reducers_by_model[model]:
      try:
        specs[key] = reducer_spec(model, key, args.smoke, args.diffrate_rates)
        keys.append(key)
      except ValueError as e:  # a missing schedule file: say so in the table rather than drop the row
        rows += [skipped(JAX, "inference", model, key, b, args, str(e)) for b in args.batches]
    dense = jax_model(model, args.smoke, dtype=jnp.bfloat16, attn_impl=attn_impl)
    params = None
    for batch in args.batches:
      images = jax.random.normal(jax.random.key(batch), (batch, hw, hw, 3), jnp.bfloat16)
      if params is None:
        params = jax.jit(dense.init)(jax.random.key(0), images[:1])
        params = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
      models = {key: dense.clone(reduce=specs[key]) for key in keys}
      timings = bench.time_models(models, params, images, warmup=args.warmup, runs=args.runs,
                                  log=lambda s, m=model, b=batch: print(f"[jax {m} b{b}] {s}", flush=True))
      for key in keys:
        t = timings[key]
        mem = bench.memory_bytes(t.compiled)
        gflops, tokens = flops_and_tokens(model, specs[key], args.smoke)
        rows.append(row(JAX, "inference", model, key, batch, args, spec=specs[key], label=label(key, specs[key]),
                        gflops=gflops, tokens_per_layer=tokens, dtype="bfloat16",
                        img_s=batch / t.median_s, median_ms=1e3 * t.median_s, runs=args.runs,
                        warmup=args.warmup, times_ms=[round(1e3 * x, 4) for x in t.times],
                        compile_s=t.compile_s, peak_mib=mem["peak"] / 2 ** 20 if mem else None, memory=mem,
                        xla_gflops=bench.xla_flops(t.compiled) / batch / 1e9, run=args.run_id))
        print(f"[jax {model} b{batch}] {key:9s} {batch / t.median_s:10.1f} img/s  compile {t.compile_s:6.1f} s  "
              f"peak {rows[-1]['peak_mib'] or float('nan'):9.1f} MiB", flush=True)
      del timings
      device_peaks.append(dict(model=model, batch=batch, peak_bytes_in_use=device_peak_bytes(jax)))
    if args.train and model in TRAIN_MODELS:
      train_keys = ["dense"] + [k for k in TRAIN_REDUCERS if k in keys]
      rows += run_jax_train(args, model, {k: specs[k] for k in train_keys})
      device_peaks.append(dict(model=model, batch=f"train {args.train_batch}",
                               peak_bytes_in_use=device_peak_bytes(jax)))
  env["device_peak_bytes_in_use"] = device_peaks
  return dict(part="jax", smoke=args.smoke, env=env, rows=rows)


def device_peak_bytes(jax) -> int | None:
  """The process-cumulative peak of device memory in use (GPU; None where the backend has no memory_stats)."""
  stats = getattr(jax.devices()[0], "memory_stats", lambda: None)()
  return None if not stats else stats.get("peak_bytes_in_use")


def run_jax_train(args, model: str, specs: dict) -> list[dict]:
  """AdamW steps (softmax CE) of the dense and reduced model, params and optimiser state donated; timed
  round-robin as the forward rows."""
  import jax
  import jax.numpy as jnp
  import optax

  from tokcomp import bench

  hw, batch = image_size(args.smoke), args.train_batch
  images = jax.random.normal(jax.random.key(1), (batch, hw, hw, 3), jnp.bfloat16)
  labels = jax.random.randint(jax.random.key(2), (batch,), 0, 1000)
  dense = jax_model(model, args.smoke, dtype=jnp.bfloat16,
                    attn_impl=None if args.attn_impl == "default" else args.attn_impl)
  params = jax.jit(dense.init)(jax.random.key(0), images[:1])["params"]
  tx = optax.adamw(1e-3, weight_decay=0.05)

  def make_step(m):
    def loss_fn(p, x, y):
      logits = m.apply({"params": p}, x, train=True)[0]
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(p, opt, x, y):
      loss, grads = jax.value_and_grad(loss_fn)(p, x, y)
      updates, opt = tx.update(grads, opt, p)
      return optax.apply_updates(p, updates), opt, loss
    return jax.jit(step, donate_argnums=(0, 1))

  compiled, state, compile_s, times = {}, {}, {}, {}
  for key, spec in specs.items():
    p = jax.tree_util.tree_map(jnp.copy, params)
    opt = tx.init(p)
    t0 = time.perf_counter()
    compiled[key] = make_step(dense.clone(reduce=spec)).lower(p, opt, images, labels).compile()
    compile_s[key], times[key] = time.perf_counter() - t0, []
    for _ in range(args.warmup):
      p, opt, loss = compiled[key](p, opt, images, labels)
      jax.block_until_ready(loss)
    state[key] = (p, opt)
    print(f"[jax {model} train b{batch}] compiled {key}: {compile_s[key]:.1f}s", flush=True)
  for _ in range(args.runs):
    for key in specs:
      t0 = time.perf_counter()
      p, opt, loss = compiled[key](*state[key], images, labels)
      jax.block_until_ready((p, opt, loss))
      times[key].append(time.perf_counter() - t0)
      state[key] = (p, opt)
  rows = []
  for key, spec in specs.items():
    median = statistics.median(times[key])
    mem = bench.memory_bytes(compiled[key])
    loss = float(compiled[key](*state[key], images, labels)[2])
    if not math.isfinite(loss):
      raise RuntimeError(f"train step {model} {key}: loss {loss}")
    gflops, tokens = flops_and_tokens(model, spec, args.smoke)
    rows.append(row(JAX_TRAIN, "train", model, key, batch, args, spec=spec, label=label(key, spec), gflops=gflops,
                    tokens_per_layer=tokens, dtype="bf16 compute, fp32 params",
                    img_s=batch / median, median_ms=1e3 * median, runs=args.runs, warmup=args.warmup,
                    times_ms=[round(1e3 * x, 4) for x in times[key]], compile_s=compile_s[key],
                    peak_mib=mem["peak"] / 2 ** 20 if mem else None, memory=mem,
                    xla_gflops=bench.xla_flops(compiled[key]) / batch / 1e9, run=args.run_id))
    print(f"[jax {model} train b{batch}] {key:9s} {batch / median:10.1f} img/s  compile {compile_s[key]:6.1f} s  "
          f"peak {rows[-1]['peak_mib'] or float('nan'):9.1f} MiB", flush=True)
  return rows


# ---------------------------------------------------------------------------------------------------------------
# --part torch

_TORCHVISION_STUB = []


def import_torch_timm():
  """torch and timm. On a CPU-only torch whose torchvision is a CUDA build (torchvision's import fails on its
  missing `nms` kernel), the two operator names timm's import path needs are declared first; a working
  torchvision is left untouched."""
  import torch
  if not torch.cuda.is_available():
    try:
      import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001  (any failure of a broken torchvision build)
      lib = torch.library.Library("torchvision", "DEF")
      lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
      _TORCHVISION_STUB.append(lib)  # the definitions live as long as the library object
  import timm
  return torch, timm


def torch_rows_planned(args) -> list[tuple[str, str, str, int]]:
  """(impl, model, reducer, batch) of every torch row the flags ask for."""
  out = []
  for model in args.models:
    tomes = [k for k in args.reducers_by_model[model] if k in TOME_R]
    for batch in args.batches:
      out += [(EAGER, model, "dense", batch), (COMPILED, model, "dense", batch)]
      out += [(OFFICIAL_TOME, model, k, batch) for k in tomes]
  return out


def run_torch(args) -> dict:
  env = dict(part="torch", host=platform.node(), started=now(), run=args.run_id, driver=nvidia_driver(),
             bf16=args.torch_bf16, python=sys.executable)
  planned = torch_rows_planned(args)
  # compile s is a cold compile, as on the JAX side (no persistent cache there): no inductor/FX cache reuse
  os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
  env["inductor_caches_disabled"] = os.environ["TORCHINDUCTOR_FORCE_DISABLE_CACHES"]
  try:
    torch, timm = import_torch_timm()
  except Exception as e:  # noqa: BLE001  (no torch/timm here: every torch row says why it is missing)
    reason = f"torch/timm not importable by {sys.executable}: {type(e).__name__}: {e}"
    print(f"[torch] {reason}", flush=True)
    return dict(part="torch", smoke=args.smoke, env=env,
                rows=[skipped(i, "inference", m, k, b, args, reason) for i, m, k, b in planned])
  cuda = torch.cuda.is_available()
  env.update(torch=torch.__version__, timm=timm.__version__, cuda=torch.version.cuda,
             device=torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()}, "
                                                               f"{os.cpu_count()} cores)")
  tome, tome_reason = None, None
  if not args.tome_repo:
    tome_reason = "no --tome_repo (a checkout of facebookresearch/ToMe)"
  else:
    try:
      sys.path.insert(0, os.path.abspath(args.tome_repo))
      import tome
      env["tome"] = os.path.dirname(tome.__file__)
    except Exception as e:  # noqa: BLE001
      tome_reason = f"import tome from {args.tome_repo} failed: {type(e).__name__}: {e}"
  device = torch.device("cuda" if cuda else "cpu")
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  cast = args.torch_bf16 == "cast"
  rows = []
  for model in args.models:
    tomes = [k for k in args.reducers_by_model[model] if k in TOME_R]
    for batch in args.batches:
      rows += torch_model_batch(torch, timm, tome, tome_reason, model, batch, tomes, device, sync, cast, args)
  return dict(part="torch", smoke=args.smoke, env=env, rows=rows)


def timm_vit(torch, timm, model: str, smoke: bool, device, cast: bool):
  from timm.models.vision_transformer import VisionTransformer
  if smoke:
    w = SMOKE_VIT
    net = VisionTransformer(img_size=SMOKE_IMAGE_SIZE, patch_size=w["patch"], embed_dim=w["width"],
                            depth=w["depth"], num_heads=w["num_heads"], mlp_ratio=w["mlp_dim"] / w["width"],
                            num_classes=1000)
  else:
    net = timm.create_model(TIMM_NAMES[model], pretrained=False)
  net = net.eval().to(device)
  return net.to(torch.bfloat16) if cast else net


def torch_model_batch(torch, timm, tome, tome_reason, model, batch, tomes, device, sync, cast, args):
  """The torch rows of one model and batch: built, first-called (compile s), warmed up, timed round-robin."""
  import copy
  hw, cuda = image_size(args.smoke), device.type == "cuda"
  tag = f"[torch {model} b{batch}]"
  net = timm_vit(torch, timm, model, args.smoke, device, cast)
  if not all(getattr(b.attn, "fused_attn", False) for b in net.blocks):
    raise RuntimeError("timm's fused attention (SDPA) is off (TIMM_FUSED_ATTN set?): the eager rows need it on")
  x = torch.randn(batch, 3, hw, hw, device=device, dtype=torch.bfloat16 if cast else torch.float32)
  calls = {(EAGER, "dense"): net, (COMPILED, "dense"): torch.compile(net, dynamic=False)}
  rows = []
  if tomes and tome is None:
    rows += [skipped(OFFICIAL_TOME, "inference", model, k, batch, args, tome_reason) for k in tomes]
  elif tomes:
    patched = copy.deepcopy(net)
    tome.patch.timm(patched)
    for k in tomes:
      calls[(OFFICIAL_TOME, k)] = (patched, (SMOKE_TOME_R if args.smoke else TOME_R)[k])

  def call(what):
    module, r = what if isinstance(what, tuple) else (what, None)
    if r is not None:
      module.r = r
    with torch.inference_mode(), torch.autocast(device.type, torch.bfloat16, enabled=not cast):
      return module(x)

  weight_bytes = sum(p.numel() * p.element_size() for p in net.parameters())
  first, times, peaks, failed = {}, {}, {}, {}
  for name, what in calls.items():
    try:
      sync()
      t0 = time.perf_counter()
      out = call(what)
      sync()
      first[name] = time.perf_counter() - t0
      if not bool(torch.isfinite(out.float()).all()):
        raise RuntimeError("non-finite logits")
      for _ in range(args.warmup):
        call(what)
      sync()
      peaks[name] = None
      if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        call(what)
        sync()
        peaks[name] = (torch.cuda.max_memory_allocated() - before + weight_bytes
                       + x.numel() * x.element_size()) / 2 ** 20
      times[name] = []
      print(f"{tag} first call {name[0]} {name[1]}: {first[name]:.1f}s", flush=True)
    except Exception as e:  # noqa: BLE001  (e.g. torch.compile without a compiler: the row says why)
      failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
      print(f"{tag} {name[0]} {name[1]} failed: {failed[name]}", flush=True)
  for _ in range(args.runs):
    for name in times:
      sync()
      t0 = time.perf_counter()
      call(calls[name])
      sync()
      times[name].append(time.perf_counter() - t0)
  for (impl, key), what in calls.items():
    if (impl, key) in failed:
      rows.append(row(impl, "inference", model, key, batch, args, status="failed", reason=failed[(impl, key)]))
      continue
    median = statistics.median(times[(impl, key)])
    rows.append(row(impl, "inference", model, key, batch, args,
                    spec=tome_spec(key, args.smoke) if key in TOME_R else None,
                    dtype="bfloat16" if cast else "bfloat16 autocast", img_s=batch / median,
                    median_ms=1e3 * median, runs=args.runs, warmup=args.warmup,
                    times_ms=[round(1e3 * t, 4) for t in times[(impl, key)]],
                    compile_s=first[(impl, key)] if impl == COMPILED else None, first_call_s=first[(impl, key)],
                    peak_mib=peaks[(impl, key)], run=args.run_id))
    print(f"{tag} {impl:20s} {key:7s} {batch / median:10.1f} img/s", flush=True)
  del calls, net
  if cuda:
    torch.cuda.empty_cache()
  return rows


# ---------------------------------------------------------------------------------------------------------------
# Folding parts, derived columns, goals, markdown (pure Python: the goals are tested on fabricated rows).

def row_id(r: dict) -> tuple:
  return (r["impl"], r["kind"], r["model"], r["reducer"], r["batch"])


def fold(parts: list[dict], sources: list[str] | None = None) -> dict:
  """Parts (part_*.json or earlier accelerator.json payloads) -> one payload with rows, envs, derived columns and
  goals. Smoke and measured parts never mix; a row measured twice is an error."""
  sources = sources or [f"part {i}" for i in range(len(parts))]
  smokes = {bool(p.get("smoke")) for p in parts}
  if len(smokes) > 1:
    raise ValueError(f"cannot merge smoke and measured results: {sources}")
  smoke = smokes == {True}
  envs, rows, seen = [], [], {}
  for p, src in zip(parts, sources):
    envs += p.get("envs", [p["env"]] if "env" in p else [])
    for r in p["rows"]:
      if row_id(r) in seen:
        raise ValueError(f"row {row_id(r)} is in both {seen[row_id(r)]} and {src}: merge only one of them")
      seen[row_id(r)] = src
      rows.append(dict(r))
  annotate(rows)
  return dict(smoke=smoke, note=SMOKE_NOTE if smoke else None, date=now(),
              envs=envs, rows=sorted(rows, key=sort_key), goals=goals(rows))


def sort_key(r: dict) -> tuple:
  return (list(MODELS).index(r["model"]), r["kind"] == "train", r["batch"], IMPL_ORDER.index(r["impl"]),
          REDUCER_ORDER.index(r["reducer"]))


def baseline_of(r: dict) -> tuple:
  impl = JAX_TRAIN if r["kind"] == "train" else JAX if r["impl"] == JAX else EAGER
  return (impl, r["kind"], r["model"], "dense", r["batch"])


def annotate(rows: list[dict]) -> None:
  """Fills gflops and tokens_per_layer where missing (tokcomp's analytic count), then flop_ratio, speedup and
  speedup_over_flop_ratio against each row's baseline (see the module docstring); None where it is missing."""
  for r in rows:
    if r["status"] == "ok" and r.get("gflops") is None:
      r["gflops"], r["tokens_per_layer"] = flops_and_tokens(r["model"], r.get("spec"), r["smoke"])
  ok = {row_id(r): r for r in rows if r["status"] == "ok"}
  for r in rows:
    base = ok.get(baseline_of(r)) if r["status"] == "ok" else None
    r["baseline"] = " ".join(map(str, baseline_of(r)))
    r["flop_ratio"] = base["gflops"] / r["gflops"] if base else None
    r["speedup"] = r["img_s"] / base["img_s"] if base else None
    r["speedup_over_flop_ratio"] = r["speedup"] / r["flop_ratio"] if base else None


def goal_batch(rows: list[dict], kind: str, wanted: int, model: str = "B") -> int | None:
  """The issue's batch (`wanted`) when `model` has rows of `kind` at it, else their largest batch (None: no rows)."""
  batches = {r["batch"] for r in rows if r["model"] == model and r["kind"] == kind and r["status"] == "ok"}
  return wanted if wanted in batches else max(batches, default=None)


def goals(rows: list[dict], model: str = "B") -> list[dict]:
  """The issue's goals on ViT-`model`: measured value, target, met, and by how much a missed one falls short
  (missed_by = target - measured for a lower bound, measured - target for an upper bound; None when met).
  A goal whose rows are missing says which."""
  ok = {row_id(r): r for r in rows if r["status"] == "ok"}
  batch = {"inference": goal_batch(rows, "inference", 256, model), "train": goal_batch(rows, "train", 128, model)}
  name = f"ViT-{MODELS[model]}"
  out = []

  def add(goal, needed, measure, target, op, note=None):
    """needed: (impl, reducer) pairs; train-step impls are looked up at the train batch."""
    found, missing = [], []
    for impl, key in needed:
      kind = "train" if impl == JAX_TRAIN else "inference"
      r = ok.get((impl, kind, model, key, batch[kind]))
      found.append(r)
      if r is None:
        missing.append(f"{impl} {LABELS[key]}" + (f" b{batch[kind]}" if batch[kind] else f" ({kind}: no rows)"))
    kind = "train" if needed[0][0] == JAX_TRAIN else "inference"
    goal = f"{goal}, {name} b{batch[kind] or '—'}"
    if missing:
      out.append(dict(goal=goal, measured=None, target=None if callable(target) else target, op=op, met=None,
                      missed_by=None, missed_by_pct=None, same_run=None,
                      note="not measured: no row " + ", ".join(missing)))
      return
    value = measure(*found)
    target = target(*found) if callable(target) else target
    met = {">=": value >= target, ">": value > target, "<=": value <= target}[op]
    short = None if met else (value - target if op == "<=" else target - value)
    out.append(dict(goal=goal, measured=value, target=target, op=op, met=met, missed_by=short,
                    missed_by_pct=None if met or not target else 100 * short / abs(target),
                    same_run=len({r.get("run") for r in found}) == 1, note=note))

  ratio = lambda a, c: a["img_s"] / c["img_s"]  # noqa: E731
  add("tokcomp dense img/s ÷ timm SDPA eager", [(JAX, "dense"), (EAGER, "dense")], ratio, 1.0, ">=")
  add("tokcomp dense img/s ÷ timm SDPA torch.compile", [(JAX, "dense"), (COMPILED, "dense")], ratio, 0.9, ">=")
  for key in ("tome13", "evit"):
    add(f"tokcomp {LABELS[key]} speedup ÷ FLOP ratio", [(JAX, key)], lambda a: a["speedup_over_flop_ratio"], 0.9,
        ">=")
    add(f"tokcomp {LABELS[key]} speedup vs official ToMe r=13's", [(JAX, key), (OFFICIAL_TOME, "tome13")],
        lambda a, c: a["speedup"], lambda a, c: c["speedup"], ">",
        "target: official ToMe r=13's speedup over timm SDPA eager")
  add("train step ToMe r=13 img/s ÷ (FLOP ratio × dense img/s)", [(JAX_TRAIN, "tome13")],
      lambda a: a["speedup_over_flop_ratio"], 0.8, ">=")
  add("train step ToMe r=13 peak memory ÷ dense", [(JAX_TRAIN, "tome13"), (JAX_TRAIN, "dense")],
      lambda a, c: a["peak_mib"] / c["peak_mib"], 1.0, "<=")
  for key in REDUCERS:
    if key in ("tome13", "evit") or (JAX, "inference", model, key, batch["inference"]) in ok:
      add(f"compile time {LABELS[key]} ÷ dense", [(JAX, key), (JAX, "dense")],
          lambda a, c: a["compile_s"] / c["compile_s"], 1.3, "<=")
  return out


def fmt(v, digits: int | None = 2, none: str = "—") -> str:
  """`digits` decimals; None: 4 significant digits (GFLOPs of smoke models are ~0.004)."""
  if v is None or (isinstance(v, float) and not math.isfinite(v)):
    return none
  return f"{v:.4g}" if digits is None else f"{v:.{digits}f}"


def tokens_text(counts) -> str:
  return "-".join(str(c) for c in counts) if counts else "—"


def env_line(envs: list[dict]) -> str:
  parts = []
  for e in envs:
    if e.get("part") == "jax":
      parts.append(f"JAX part on {e.get('device')} (jax {e.get('jax')}, jaxlib {e.get('jaxlib')}, flax "
                   f"{e.get('flax')}, optax {e.get('optax')}; attention {e.get('attn_impl')}), "
                   f"started {e.get('started')}")
    elif e.get("part") == "torch":
      parts.append(f"PyTorch part on {e.get('device', '?')} (torch {e.get('torch', '—')}, "
                   f"timm {e.get('timm', '—')}, CUDA {e.get('cuda', '—')}, bf16 by {e.get('bf16')}), "
                   f"started {e.get('started')}")
  drivers = sorted({e["driver"] for e in envs if e.get("driver")})
  return ("; ".join(parts) or "no parts") + f". Driver: {', '.join(drivers) or 'none (no nvidia-smi)'}."


def markdown(payload: dict) -> str:
  rows = payload["rows"]
  lines = []
  if payload.get("smoke"):
    lines += [f"**{SMOKE_NOTE}.**", ""]
  lines += [f"Accelerator benchmark (issue 9). Written {payload['date']}. {env_line(payload['envs'])}", ""]
  lines += ["img/s: batch ÷ median call time over the row's timed runs (after warm-up, calls of one model and batch "
            "round-robin, synchronised per call). Speedup and FLOP ratio: against the dense row of the same model, "
            "batch and kind (tokcomp dense for tokcomp rows, timm SDPA eager dense for all torch rows). Peak MiB: "
            "tokcomp: XLA memory_analysis of the row's executable (argument + output + temp − alias); torch: "
            "max_memory_allocated during one call − allocated before + the row's weights and input (none on CPU). "
            "Compile s: lower+compile (tokcomp), first call of torch.compile (timm). Official ToMe GFLOPs: "
            "tokcomp's ToMe count rule (parity-tested).", ""]
  for model in [m for m in MODELS if any(r["model"] == m for r in rows)]:
    mrows = [r for r in rows if r["model"] == model]
    lines += [f"## {mrows[0]['model_name']} at {mrows[0]['image_size']}", ""]
    measured = [r for r in mrows if r["status"] == "ok"]
    if measured:
      lines += ["| impl | reducer | batch | dtype | tokens per layer | GFLOPs | FLOP ratio | img/s | speedup | "
                "speedup ÷ FLOP ratio | peak MiB | compile s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in measured:
      lines.append(f"| {r['impl']} | {r['label']} | {r['batch']} | {r.get('dtype')} | "
                   f"{tokens_text(r.get('tokens_per_layer'))} | {fmt(r.get('gflops'), None)} | "
                   f"{fmt(r['flop_ratio'])} | {fmt(r['img_s'], 1)} | {fmt(r['speedup'])} | "
                   f"{fmt(r['speedup_over_flop_ratio'])} | {fmt(r.get('peak_mib'), 1)} | "
                   f"{fmt(r.get('compile_s'), 1)} |")
    missing = [r for r in mrows if r["status"] != "ok"]
    if missing:
      lines += ["", "Not measured:"] + [f"- {r['impl']} {r['label']} b{r['batch']}: {r['status']}: {r['reason']}"
                                        for r in missing]
    lines.append("")
  lines += ["## Goals (issue 9)", "", "| goal | measured | target | result |", "|---|---|---|---|"]
  for g in payload["goals"]:
    if g["measured"] is None:
      result = g["note"]
    elif g["met"]:
      result = "met"
    else:
      result = f"missed by {g['missed_by']:.2f} ({g['missed_by_pct']:.0f}% of the target)"
    if g["same_run"] is False:
      result += " (rows from different runs)"
    note = f" ({g['note']})" if g["measured"] is not None and g.get("note") else ""
    lines.append(f"| {g['goal']} | {fmt(g['measured'])} | {g['op']} {fmt(g['target'])}{note} | {result} |")
  peaks = [p for e in payload["envs"] for p in e.get("device_peak_bytes_in_use", []) if p.get("peak_bytes_in_use")]
  if peaks:
    lines += ["", "JAX process peak_bytes_in_use (cumulative over the process, not per row): " + ", ".join(
        f"after {p['model']} b{p['batch']}: {p['peak_bytes_in_use'] / 2 ** 20:.0f} MiB" for p in peaks)]
  return "\n".join(lines) + "\n"


def write(payload: dict, out: str) -> None:
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "accelerator.json"), "w") as f:
    json.dump(payload, f, indent=1)
  with open(os.path.join(out, "accelerator.md"), "w") as f:
    f.write(markdown(payload))


# ---------------------------------------------------------------------------------------------------------------
# Command line

def comma_list(flag: str, valid) -> callable:
  def parse(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in valid]
    if bad or not items:
      raise argparse.ArgumentTypeError(f"{flag} {text!r}: must be a comma list of {', '.join(valid)}")
    return items
  return parse


def batch_list(text: str) -> list[int]:
  if text.strip() == "none":
    return []
  try:
    out = [int(t) for t in text.split(",") if t.strip()]
  except ValueError:
    out = []
  if not out or min(out) < 1:
    raise argparse.ArgumentTypeError(f"--batches {text!r}: must be positive ints joined by ',' (or 'none')")
  return out


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--models", type=comma_list("--models", tuple(MODELS)), default=list(MODELS))
  ap.add_argument("--batches", type=batch_list, default=[1, 64, 256],
                  help="inference batch sizes; 'none' for training rows only")
  ap.add_argument("--reducers", type=comma_list("--reducers", REDUCERS), default=None,
                  help=f"default: {','.join(REDUCERS)} (ViT-L: {','.join(DEFAULT_REDUCERS['L'])}); dense always runs")
  ap.add_argument("--train", action=argparse.BooleanOptionalAction, default=True,
                  help="AdamW train-step rows for S and B (dense, tome13, evit)")
  ap.add_argument("--train_batch", type=int, default=128)
  ap.add_argument("--runs", type=int, default=None, help="timed calls per row (>= 30; default 30, smoke 3)")
  ap.add_argument("--warmup", type=int, default=None, help="untimed calls per row after compiling (default 5, smoke 1)")
  ap.add_argument("--smoke", action="store_true", help="tiny models on CPU for tests: not a measurement")
  ap.add_argument("--parts", type=comma_list("--parts", ("jax", "torch")), default=["jax", "torch"])
  ap.add_argument("--part", choices=("jax", "torch"), default=None, help="run one part in this process")
  ap.add_argument("--part_json", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--run_id", default=None, help=argparse.SUPPRESS)  # the parent's start: rows of one run share it
  ap.add_argument("--torch_python", default=sys.executable, help="interpreter of the torch part")
  ap.add_argument("--torch_bf16", choices=("cast", "autocast"), default="cast",
                  help="model.to(bfloat16) with bf16 images, or fp32 weights under torch.autocast(bfloat16)")
  ap.add_argument("--tome_repo", default=None, help="a checkout of facebookresearch/ToMe, imported at run time")
  ap.add_argument("--diffrate_rates", default=None, help="the authors' compression_rate.json (OpenGVLab/DiffRate)")
  ap.add_argument("--attn_impl", choices=("default", "xla", "cudnn"), default="default",
                  help="tokcomp's jax.nn.dot_product_attention implementation")
  ap.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="fold these part/accelerator JSONs")
  ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "accelerator"))
  return ap


def parse_args(argv=None):
  ap = parser()
  args = ap.parse_args(argv)
  if args.runs is None:
    args.runs = 3 if args.smoke else 30
  if args.warmup is None:
    args.warmup = 1 if args.smoke else 5
  args.run_id = args.run_id or now()
  if args.runs < 30 and not args.smoke:
    ap.error(f"--runs {args.runs}: must be >= 30 (the issue's minimum) unless --smoke")
  if args.runs < 1 or args.warmup < 1 or args.train_batch < 1:
    ap.error(f"--runs {args.runs}, --warmup {args.warmup}, --train_batch {args.train_batch}: must be >= 1")
  if args.tome_repo and not os.path.isfile(os.path.join(args.tome_repo, "tome", "patch", "timm.py")):
    ap.error(f"--tome_repo {args.tome_repo!r}: must be a ToMe checkout (with tome/patch/timm.py)")
  if args.diffrate_rates and not os.path.isfile(args.diffrate_rates):
    ap.error(f"--diffrate_rates {args.diffrate_rates!r}: no such file")
  if not args.batches and not args.train:
    ap.error("--batches none with --no-train: nothing to run")
  args.reducers_by_model = {m: list(args.reducers or DEFAULT_REDUCERS[m]) for m in MODELS}
  return args


def run_parent(args, argv: list[str]) -> dict:
  """Runs each part as a child process, one after the other, and folds their JSONs."""
  os.makedirs(args.out, exist_ok=True)
  parts, sources = [], []
  for part in args.parts:
    path = os.path.join(args.out, f"part_{part}.json")
    if os.path.exists(path):
      os.remove(path)
    python = args.torch_python if part == "torch" else sys.executable
    cmd = [python, os.path.abspath(__file__), *argv, "--part", part, "--part_json", path, "--run_id", args.run_id]
    print(f"[parent] {' '.join(cmd)}", flush=True)
    try:
      rc = subprocess.run(cmd, cwd=ROOT).returncode
    except OSError as e:
      rc = f"not started ({e})"
    if rc == 0 and os.path.exists(path):
      with open(path) as f:
        parts.append(json.load(f))
    else:
      parts.append(failed_part(part, args, f"the {part} part exited with {rc} (its log is above)"))
    sources.append(path)
  return fold(parts, sources)


def failed_part(part: str, args, reason: str) -> dict:
  """A part whose child died: its planned rows, each marked with the reason."""
  if part == "torch":
    rows = [row(i, "inference", m, k, b, args, status="failed", reason=reason)
            for i, m, k, b in torch_rows_planned(args)]
  else:
    rows = [row(JAX, "inference", m, k, b, args, status="failed", reason=reason)
            for m in args.models for k in ["dense"] + args.reducers_by_model[m] for b in args.batches]
  return dict(part=part, smoke=args.smoke, env=dict(part=part, started=now()), rows=rows)


def main(argv=None):
  argv = list(sys.argv[1:] if argv is None else argv)
  args = parse_args(argv)
  if args.merge:
    parts = []
    for path in args.merge:
      with open(path) as f:
        parts.append(json.load(f))
    payload = fold(parts, args.merge)
  elif args.part:
    payload = run_jax(args) if args.part == "jax" else run_torch(args)
    path = args.part_json or os.path.join(args.out, f"part_{args.part}.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
      json.dump(payload, f, indent=1)
    print(f"[{args.part}] wrote {path}", flush=True)
    return payload
  else:
    payload = run_parent(args, argv)
  write(payload, args.out)
  print(markdown(payload), flush=True)
  print(f"wrote {os.path.join(args.out, 'accelerator.json')} and accelerator.md", flush=True)
  return payload


if __name__ == "__main__":
  main()
