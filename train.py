r"""Training entry point (big_vision style): `python train.py --config configs/x.py:arg --workdir DIR`.

One story, top to bottom: mesh -> input -> model -> sharded state -> step -> checkpoint (auto-resume) -> loop ->
evaluation. The work is in `train_and_evaluate(config, workdir)`, which tests and notebooks import.

- Mesh: devices reshaped to (data, fsdp); the batch is split over both axes, parameters are replicated or,
  with fsdp > 1, sharded FSDP-style along their largest divisible axis. One jit with in/out shardings and a
  donated state; token ops never cross examples, so they add no collectives.
- Input: grain over a tfds / npz / embedded source; each host reads its own shard
  (`jax.make_array_from_process_local_data` builds the global batch).
- Optimiser: optax AdamW, linear warmup + cosine decay, global-norm clipping, label smoothing, optional mixup,
  optional bf16 compute (params and optimiser state stay fp32).
- Any registered reducer can be trained in (`config.reduce`, e.g. "tome:r=8" or "evit:keep=0.7,layers=3-6-9"), or
  switched in stages (`config.reduce_schedule`, e.g. EViT's keep rate annealed; one compile per stage).
  Learned reducers (DynamicViT, ...) add their parameters to the model and the loss terms they sow into the
  "losses" collection to the objective; `config.distill` adds DynamicViT-style distillation from a frozen dense
  teacher (KL on the logits and MSE on the kept final tokens, Rao et al. 2021 eqs. 12-13), and with
  `config.distill.frd` SiT's FRD token distillation (every block's tokens, sown by `sit:...,frd=1`).
- `config.task = "reconstruct"` trains a 1D tokenizer (`tokcomp.tokenizers`, `config.model_name` titok /
  one_d_piece / flextok) on images in [0, 1]: its own loss terms (quantizer, flow matching) plus an L1/L2 pixel
  loss (`config.recon_loss`, `config.recon_weight`) and an optional perceptual loss on a frozen ViT the user
  supplies (`config.perceptual`); the run ends with PSNR / SSIM at a few kept lengths.
- Orbax `CheckpointManager` in `workdir/ckpt`: keeps `config.keep_ckpts`, saves every `config.ckpt_every` steps
  and at the end, and resumes the model, optimiser and data iterator from the latest step.
- Logs: `workdir/metrics.jsonl` and TensorBoard events in `workdir/tb` (loss, lr, img/s, tokens per layer), and
  a progress line on stdout.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import time
from typing import Any

import grain.python as grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorboardX
from absl import app, flags, logging
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec as P
from ml_collections import config_flags

from tokcomp import data, evaluation, models, reducers, schedules, tokenizers
from tokcomp.tokenizers import evaluation as recon_eval, losses as recon_losses

TASKS = ("classify", "reconstruct")

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/*.py[:arg]", lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", "workdirs/train", "Checkpoints, metrics.jsonl and summary.json.")


@struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


# --- reduction stages ---------------------------------------------------------------------------------------

def reduce_stages(config) -> list[tuple[int, str | None]]:
  """[(first step, reducer spec)], from `config.reduce` (one stage) or `config.reduce_schedule`, whose entries
  "spec@step" are joined by '|': "evit:keep=0.9,layers=3-6-9@0|evit:keep=0.7,layers=3-6-9@3000" anneals EViT's
  keep rate in stages, or from `config.reduce_anneal` (EViT's cosine anneal, `schedules.cosine_anneal`).
  Each stage has static token counts, so it compiles once."""
  sched = config.get("reduce_schedule", "")
  anneal = config.get("reduce_anneal", None)
  if anneal and sched:
    raise ValueError("config.reduce_anneal and config.reduce_schedule are exclusive: give one")
  if anneal:  # e.g. dict(spec="evit:keep={keep},layers=3-6-9", start=.., steps=.., base=0.7, stages=8)
    if "{keep}" not in anneal.get("spec", ""):
      raise ValueError(f"config.reduce_anneal.spec={anneal.get('spec')!r}: must contain '{{keep}}', "
                       "e.g. 'evit:keep={keep},layers=3-6-9'")
    pieces = schedules.cosine_anneal(int(anneal["start"]), int(anneal["steps"]), float(anneal["base"]),
                                     float(anneal.get("maximum", 1.0)), int(anneal.get("stages", 8)))
    sched = "|".join(f"{anneal['spec'].format(keep=round(rho, 6))}@{t}" for t, rho in pieces)
  if not sched:
    return [(1, config.get("reduce") or None)]
  stages = []
  for entry in sched.split("|"):
    spec, at, step = entry.strip().rpartition("@")
    if not at or not step.strip().isdigit():
      raise ValueError(f"config.reduce_schedule entry {entry!r}: must be 'spec@step', e.g. 'tome:r=8@1000'")
    stages.append((max(1, int(step)), spec.strip() or None))
  if [s for s, _ in stages] != sorted(s for s, _ in stages):
    raise ValueError(f"config.reduce_schedule={sched!r}: steps must increase")
  return stages


def stage_at(stages, step: int) -> str | None:
  current = stages[0][1]
  for start, spec in stages:
    if step >= start:
      current = spec
  return current


# --- mesh and sharding -----------------------------------------------------------------------------------------

def make_mesh(config) -> jax.sharding.Mesh:
  devices = np.asarray(jax.devices())
  fsdp = int(config.get("mesh_fsdp", 1))
  if fsdp < 1 or len(devices) % fsdp:
    raise ValueError(f"config.mesh_fsdp={fsdp}: must divide the device count {len(devices)}")
  return jax.sharding.Mesh(devices.reshape(-1, fsdp), ("data", "fsdp"))


def param_sharding(mesh: jax.sharding.Mesh, tree, min_size: int = 2 ** 14):
  """Replicated, or with fsdp > 1 the largest axis divisible by the fsdp size is split (small arrays stay whole)."""
  n = mesh.shape["fsdp"]

  def spec(x):
    if n == 1 or x.size < min_size:
      return NamedSharding(mesh, P())
    for axis in np.argsort(x.shape)[::-1]:
      if x.shape[axis] % n == 0:
        parts = [None] * x.ndim
        parts[axis] = "fsdp"
        return NamedSharding(mesh, P(*parts))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map(spec, tree)


def global_batch(mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


# --- the run -------------------------------------------------------------------------------------------------

def train_and_evaluate(config, workdir: str) -> dict:
  os.makedirs(workdir, exist_ok=True)
  task = config.get("task", "classify")
  if task not in TASKS:
    raise ValueError(f"config.task={task!r}: must be one of {TASKS}")
  reconstruct = task == "reconstruct"
  if reconstruct and (config.get("distill", None) or config.get("flops_target", None) or config.get("reduce")):
    raise ValueError("config.task='reconstruct' trains a tokenizer: config.distill, config.flops_target and "
                     "config.reduce apply to classifiers only")
  mesh = make_mesh(config)
  if config.batch % mesh.size:
    raise ValueError(f"config.batch={config.batch}: must be divisible by the {mesh.size} devices of the mesh")

  # Input.
  train_src = data.get_source(config.data.source, config.data.train_split)
  test_src = data.get_source(config.data.source, config.data.test_split)
  mean, std = ((0.0,), (1.0,)) if reconstruct else data.stats_for(config.data.source)  # tokenizers see [0, 1]
  image_size = config.data.get("image_size", None)  # None: the source's own (fixed) size
  loader = data.train_loader(train_src, global_batch=config.batch, seed=config.seed, image_size=image_size,
                             inception_crop=config.data.get("inception_crop", False),
                             crop_pad=config.data.get("crop_pad", 0), flip=config.data.get("flip", False),
                             mean=mean, std=std, worker_count=config.data.get("workers", 0))
  first = np.asarray(train_src[0]["image"])
  image_hw = (image_size, image_size) if image_size else first.shape[:2]
  in_channels = first.shape[-1] if first.ndim == 3 else 1

  # Model.
  dtype = jnp.dtype(config.get("dtype", "float32"))
  if reconstruct:  # a 1D tokenizer: one stage; its "tokens per layer" is the latent sequence length K
    model = tokenizers.get(config.model_name)(**config.model)
    stages, stage_models = [(1, None)], {None: model}
    tokens = {None: [model.num_latent_tokens]}
    perceptual = perceptual_features(config.get("perceptual", None))
  else:
    stages = reduce_stages(config)
    model = models.get(config.get("model_name", "vit"))(**config.model, reduce=stages[-1][1], dtype=dtype)
    # (the final stage is what is evaluated)
    stage_models = {spec: model.clone(reduce=spec) for _, spec in stages}
    tokens = {spec: [c.n_mlp for c in m.plan(image_hw)[1]] for spec, m in stage_models.items()}  # checks every spec
    num_classes = config.model["num_classes"]

  # Optimiser.
  decay_steps = max(config.steps, config.warmup_steps + 1)  # optax needs at least one step past warmup
  lr = optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, decay_steps,
                                          end_value=config.lr * config.get("lr_end_factor", 0.0))
  tx = optax.chain(optax.clip_by_global_norm(config.grad_clip),
                   optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=config.weight_decay))
  if config.get("train_only", ""):  # e.g. DiffRate's search: only the rate logits learn, the ViT is frozen
    pattern = re.compile(config.train_only)
    label = lambda path, _: "train" if pattern.search("/".join(str(getattr(k, "key", k)) for k in path)) else "freeze"
    tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()},
                               lambda params: jax.tree_util.tree_map_with_path(label, params))

  # Sharded state: parameters are created directly in their sharding.
  def init(rng):
    dummy = jnp.zeros((1, *image_hw, in_channels))
    if reconstruct:
      params = {"params": model.init({"params": rng, "token_drop": rng, "noise": rng}, dummy)["params"]}
      return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
    params = {"params": model.clone(reduce=None).init(rng, dummy)["params"]}
    for m in stage_models.values():  # learned reducers add their own parameters (the same rng: the ViT's agree)
      params = merge_params(params, {"params": m.init(rng, dummy)["params"]})
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))

  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  state_sharding = param_sharding(mesh, abstract)
  state_sharding = state_sharding.replace(step=NamedSharding(mesh, P()))
  state = jax.jit(init, out_shardings=state_sharding)(jax.random.key(config.seed))
  init_from = config.get("init_from", "")

  # Distillation teacher: the dense model on frozen weights (the init_from run's, or another file/workdir).
  distill = config.get("distill", None)
  teacher, teacher_params, teacher_sharding = None if reconstruct else model.clone(reduce=None), None, None
  if distill:
    source = distill.get("teacher", "init")
    source = init_from if source == "init" else source
    if not source:
      raise ValueError("config.distill.teacher='init' needs config.init_from (the dense model to distil from)")
    t_abstract = jax.eval_shape(teacher.init, jax.random.key(0), jnp.zeros((1, *image_hw, in_channels)))
    teacher_params, missing = load_init(source, jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype),
                                                                      t_abstract))
    if missing:
      raise ValueError(f"config.distill.teacher={source!r} lacks parameters of the dense model: {missing[:5]}")
    teacher_sharding = param_sharding(mesh, t_abstract)
    teacher_params = jax.device_put(teacher_params, teacher_sharding)

  flops_target = config.get("flops_target", None)
  if flops_target and not 0.0 < float(flops_target.get("ratio", -1)) <= 1.0:
    raise ValueError(f"config.flops_target.ratio={flops_target.get('ratio')!r}: must be a fraction of the dense "
                     "FLOPs in (0, 1]")

  # Step.
  def train_step(state: TrainState, batch, rng, teacher_params, model):
    rng_mix, rng_model = jax.random.split(rng)

    def loss_fn(params):
      images = batch["image"].astype(dtype)
      if reconstruct:
        return reconstruction_objective(model, params, images, rng_model, config, perceptual)
      labels = optax.smooth_labels(jax.nn.one_hot(batch["label"], num_classes), config.label_smoothing)
      images, labels = data.mixup(rng_mix, images, labels, config.get("mixup", 0.0))
      (logits, aux), sown = model.apply(params, images, train=True, rngs={"gumbel": rng_model},
                                        mutable=["losses", "counts", "distill"])
      parts = {"ce": optax.softmax_cross_entropy(logits, labels).mean()}
      parts["reducer"] = sum(jnp.sum(l) for l in jax.tree_util.tree_leaves(sown.get("losses", {})))
      frd_tokens = sown.get("distill", {})  # per-block full-length tokens sown for SiT's FRD (sit:...,frd=1)
      if frd_tokens and not (distill and distill.get("frd")):
        raise ValueError("the model sows per-block tokens for SiT's FRD (a sit:...,frd=1 reducer): set "
                         "config.distill (the dense teacher) with frd=<weight> (SiT's lambda_token, 2.0)")
      if distill:
        t_logits, t_aux, t_blocks = teacher_forward(teacher, jax.lax.stop_gradient(teacher_params), images,
                                                    blocks=bool(distill.get("frd")))
        parts.update(distill_losses(distill, logits, aux["tokens"], t_logits, t_aux["tokens"]))
        if distill.get("frd"):
          parts["distill_frd"] = frd_loss(float(distill["frd"]), frd_tokens, t_blocks,
                                          t_aux["tokens"].num_protected)
      if flops_target:
        parts["flops"] = flops_loss(flops_target, model, sown.get("counts", {}), image_hw, in_channels)
      return sum(parts.values()), parts

    (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = parts.pop("metrics", {})
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), {
        "loss": loss, "grad_norm": optax.tree.norm(grads), **{f"loss_{k}": v for k, v in parts.items()},
        **{f"metric_{k}": v for k, v in metrics.items()}}

  batch_sharding = NamedSharding(mesh, P(("data", "fsdp")))
  step_fns = {spec: jax.jit(functools.partial(train_step, model=m),  # one compile per reduction stage
                            in_shardings=(state_sharding, batch_sharding, NamedSharding(mesh, P()),
                                          teacher_sharding),
                            out_shardings=(state_sharding, NamedSharding(mesh, P())), donate_argnums=0)
              for spec, m in stage_models.items()}

  # Checkpoints: resume model, optimiser and data position from the latest step.
  ckpt = ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, "ckpt")), item_names=("state", "data"),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_ckpts, save_interval_steps=config.ckpt_every,
                                           enable_async_checkpointing=False))
  it = iter(loader)
  start = 0
  if ckpt.latest_step() is not None:
    start = ckpt.latest_step()
    restored = ckpt.restore(start, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(jax.tree_util.tree_map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding)),
        data=grain.PyGrainCheckpointRestore(it)))
    state = restored["state"]
    print(f"resumed from step {start} in {workdir}", flush=True)
    _truncate_metrics(os.path.join(workdir, "metrics.jsonl"), start)
  elif init_from:  # fine-tune: weights from another run, fresh optimiser, step 0
    params, kept_fresh = load_init(init_from, state.params)
    params = jax.device_put(params, state_sharding.params)
    state = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                    out_shardings=state_sharding)(params)
    print(f"initialised from {init_from}" + (f"; kept fresh: {_modules(kept_fresh)}" if kept_fresh else ""),
          flush=True)

  # Loop.
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  writer = tensorboardX.SummaryWriter(os.path.join(workdir, "tb")) if jax.process_index() == 0 else None
  rng = jax.random.key(config.seed + 1)
  t_log, n_log, loss = time.perf_counter(), 0, float("nan")
  for step in range(start + 1, config.steps + 1):
    batch = global_batch(mesh, {k: v for k, v in next(it).items() if k in ("image", "label")})
    spec = stage_at(stages, step)
    state, m = step_fns[spec](state, batch, jax.random.fold_in(rng, step), teacher_params)
    n_log += config.batch
    if step % config.log_every == 0 or step == config.steps:
      loss = float(m["loss"])  # the only host sync in the loop, once per log interval
      if not np.isfinite(loss):
        raise FloatingPointError(f"loss is {loss} at step {step}")
      dt = time.perf_counter() - t_log
      row = {"step": step, "loss": loss, "grad_norm": float(m["grad_norm"]), "lr": float(lr(step)),
             **{k: float(v) for k, v in m.items() if k.startswith(("loss_", "metric_"))},
             "img_per_s": n_log / dt, "reduce": spec or "", "tokens_per_layer": tokens[spec]}
      if writer is not None:
        with open(metrics_path, "a") as f:
          f.write(json.dumps(row) + "\n")
        for key in ("loss", "grad_norm", "lr", "img_per_s"):
          writer.add_scalar(f"train/{key}", row[key], step)
        writer.add_scalar("train/mean_tokens", float(np.mean(row["tokens_per_layer"])), step)
        writer.flush()
      print(f"[{step}/{config.steps}] loss {loss:.4f}  lr {row['lr']:.2e}  {row['img_per_s']:.0f} img/s", flush=True)
      t_log, n_log = time.perf_counter(), 0
    if ckpt.should_save(step) or step == config.steps:
      ckpt.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                              data=grain.PyGrainCheckpointSave(it)), force=step == config.steps)
  ckpt.wait_until_finished()

  if reconstruct:
    return finish_tokenizer(config, model, state.params, test_src, workdir, loss, image_size, int(state.step))

  # Exports: a search writes what it found (DiffRate: workdir/compression_rate.json).
  for method in {s.method for s in reducers.build_schedule(stages[-1][1], model.depth) if s is not None}:
    if reducers.get(method).export is not None and jax.process_index() == 0:
      print(f"{method}: wrote {reducers.get(method).export(state.params, model, workdir, image_hw)}", flush=True)

  # Evaluation.
  acc = evaluation.accuracy(model, state.params, test_src, batch=config.get("eval_batch", config.batch), mean=mean,
                            std=std, limit=config.get("eval_limit", None), image_size=image_size)
  summary = {"test_accuracy": acc["accuracy"], "test_examples": acc["examples"]}
  summary.update(steps=int(state.step), final_loss=loss, reduce=stages[-1][1] or "", tokens_per_layer=tokens[stages[-1][1]],
                 gflops=model.flops(image_hw, in_channels) / 1e9, model_name=config.get("model_name", "vit"),
                 model=config.model.to_dict())
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary), flush=True)
  return summary


# --- the reconstruct task (1D tokenizers) ---------------------------------------------------------------------

def perceptual_features(spec) -> recon_losses.ViTFeatures | recon_losses.LPIPSLoss | None:
  """`config.perceptual = dict(weights=W, model=dict(...ViT fields...), blocks=(1, 3), weight=0.1, source=S)`:
  the frozen ViT whose features the perceptual loss compares (W: a train.py workdir or a timm / big_vision file;
  S: the data source whose mean/std that ViT was trained with; image_size: the side it was trained at).
  `config.perceptual = dict(kind="lpips_vgg", weights=V, lin_weights=L, weight=0.1, resize=0)`: real LPIPS-VGG
  (tokcomp/tokenizers/lpips.py; V: torchvision VGG16 weights, L: the lpips package's weights/v0.1/vgg.pth, both
  as .safetensors / .npz, see tokcomp/checkpoints/lpips.py; resize: a side >= 32 both images are resized to
  first, 0 to keep their size)."""
  if not spec:
    return None
  kind = spec.get("kind", "vit")
  if kind == "lpips_vgg":
    from tokcomp.checkpoints import lpips as lpips_weights
    if not spec.get("weights"):
      raise ValueError("config.perceptual.kind='lpips_vgg' needs weights= (torchvision VGG16 IMAGENET1K_V1 "
                       "`features`) and lin_weights= (the lpips package's weights/v0.1/vgg.pth), each a "
                       f".safetensors or .npz file; nothing is downloaded. {lpips_weights.CONVERT_HINT}")
    params = lpips_weights.load(spec["weights"], spec.get("lin_weights", None) or None)
    return recon_losses.LPIPSLoss(params, resize=spec.get("resize", 0))
  if kind != "vit":
    raise ValueError(f"config.perceptual.kind={kind!r}: must be 'vit' (a tokcomp ViT's tokens) or 'lpips_vgg'")
  for key in ("weights", "model"):
    if key not in spec:
      raise ValueError(f"config.perceptual.{key} is required, e.g. perceptual=dict(weights='benchmarks/fmnist_vit', "
                       "model=dict(...the ViT's config.model...), blocks=(1, 3), weight=0.1)")
  vit = models.get("vit")(**spec["model"])
  side = spec.get("image_size", None)  # the size the ViT was trained at (its pos_embedding's grid)
  hw = (side, side) if side else (8 * vit.patch_size[0], 8 * vit.patch_size[1])
  fresh = jax.eval_shape(vit.init, jax.random.key(0), jnp.zeros((1, *hw, spec.get("in_channels", 1))))
  params, missing = load_init(spec["weights"], jax.tree_util.tree_map(lambda a: np.zeros(a.shape, a.dtype), fresh))
  if missing:
    raise ValueError(f"config.perceptual.weights={spec['weights']!r} lacks ViT parameters: {missing[:5]}")
  mean, std = data.stats_for(spec.get("source", "embedded:fashion_mnist"))
  return recon_losses.ViTFeatures(vit, jax.tree_util.tree_map(jnp.asarray, params),
                                  tuple(spec.get("blocks", (1, 3))), mean, std)


def reconstruction_objective(model, params, images, rng, config, perceptual):
  """The tokenizer's own loss terms (quantizer, flow matching, ...) + the pixel loss on its reconstruction
  (`config.recon_loss`, weight `config.recon_weight`) + the optional perceptual loss."""
  rng_drop, rng_noise = jax.random.split(rng)
  out = model.apply(params, images, train=True, rngs={"token_drop": rng_drop, "noise": rng_noise})
  parts = dict(out["losses"])
  if out["recon"] is not None:
    parts["recon"] = config.get("recon_weight", 1.0) * recon_losses.pixel_loss(
        out["recon"], images, config.get("recon_loss", "l1"))
    if perceptual is not None:
      parts["perceptual"] = float(config.perceptual.get("weight", 0.1)) * recon_losses.perceptual_loss(
          perceptual, out["recon"], images)
  loss = sum(parts.values())
  return loss, {**parts, "metrics": dict(out.get("metrics", {}))}


def finish_tokenizer(config, model, params, test_src, workdir, loss, image_size, steps) -> dict:
  """PSNR / SSIM on the test split at kept lengths 1, K/4, K/2 and K -> summary.json (eval.py --mode=recon
  sweeps every length)."""
  k = model.num_latent_tokens
  lengths = sorted({1, max(1, k // 4), max(1, k // 2), k})
  curve = recon_eval.length_curve(model, params, test_src, lengths, batch=config.get("eval_batch", config.batch),
                                  limit=config.get("eval_limit", None), image_size=image_size)
  summary = {"steps": steps, "final_loss": loss, "model_name": config.model_name,
             "num_latent_tokens": k, "test_psnr": curve[-1].psnr, "test_ssim": curve[-1].ssim,
             "curve": [dataclasses.asdict(r) for r in curve]}
  with open(os.path.join(workdir, "summary.json"), "w") as f:
    json.dump(summary, f, indent=1)
  print(json.dumps(summary), flush=True)
  return summary


def merge_params(a, b):
  """Union of two parameter trees (b adds what a lacks; shared leaves must agree in shape)."""
  from flax import traverse_util
  fa, fb = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  for k in fa.keys() & fb.keys():
    if fa[k].shape != fb[k].shape:
      raise ValueError(f"parameter {'/'.join(k)}: shapes {fa[k].shape} and {fb[k].shape} differ between stages")
  return traverse_util.unflatten_dict({**fb, **fa})


def flops_loss(target, model, counts, image_hw, in_channels) -> jax.Array:
  """weight * (FLOPs / dense FLOPs - ratio)^2 (DiffRate eq. 10, on the ratio to the dense FLOPs)."""
  flops = sown_flops(model, counts, image_hw, in_channels)
  dense = model.clone(reduce=None).flops(image_hw, in_channels)
  return float(target.get("weight", 5.0 * 4.6 ** 2)) * (flops / dense - float(target["ratio"])) ** 2


def sown_flops(model, counts, image_hw, in_channels) -> jax.Array:
  """The model's FLOPs (`schedules.vit_flops`) from the token counts that reducers sowed into the "counts"
  collection, one per block, keeping their straight-through gradients (DiffRate's calculate_flop_training)."""
  blocks = counts.get("Transformer", {})
  if not blocks:
    raise ValueError("config.flops_target needs a reducer that sows its token counts (e.g. diffrate_search)")
  gh, gw = model.grid(image_hw)
  n = float(model.num_prefix + gh * gw)
  layers = []
  for i in range(model.depth):
    leaves = jax.tree_util.tree_leaves(blocks.get(f"encoderblock_{i}", {}))
    n_out = leaves[0] if leaves else n
    layers.append(schedules.LayerCounts(n_attn=n, n_mlp=n_out))
    n = n_out
  dims = (model.width, model.mlp_dim, tuple(model.patch_size), gh * gw, model.num_classes, in_channels)
  return schedules.vit_flops(layers, *dims)


def distill_losses(distill, logits, tokens, t_logits, t_tokens) -> dict:
  """DynamicViT's distillation (Rao et al. 2021, eqs. 12-13; `DistillDiffPruningLoss_dynamic` with mse_token):
  KL(teacher || student) on the logits (batch mean), and the MSE between the student's final tokens and the
  teacher's over the tokens the student kept (its final policy > 0.5), both weighted."""
  out = {}
  w_logits, w_tokens = float(distill.get("logits", 0.5)), float(distill.get("tokens", 0.5))
  if w_logits:
    t_logp = jax.nn.log_softmax(t_logits.astype(jnp.float32))
    kl = jnp.sum(jnp.exp(t_logp) * (t_logp - jax.nn.log_softmax(logits.astype(jnp.float32))), axis=-1)
    out["distill_logits"] = w_logits * jnp.mean(kl)
  if w_tokens:
    if tokens.n != t_tokens.n:
      raise ValueError(f"config.distill.tokens={w_tokens}: token distillation needs the student at full length in "
                       f"training (DynamicViT's policy), but it ends with {tokens.n} tokens and the teacher with "
                       f"{t_tokens.n}; set config.distill.tokens=0")
    p = tokens.num_protected
    keep = (tokens.keep_weight()[:, p:] > 0.5).astype(jnp.float32)[..., None]
    sq = (tokens.x[:, p:].astype(jnp.float32) - t_tokens.x[:, p:].astype(jnp.float32)) ** 2
    n_kept = jnp.sum(keep) * sq.shape[-1]
    out["distill_tokens"] = w_tokens * jnp.where(n_kept > 0, jnp.sum(keep * sq) / jnp.maximum(n_kept, 1), 0.0)
  return out


def teacher_forward(teacher, params, images, blocks: bool = False):
  """The frozen teacher's (logits, aux, block outputs): with blocks, every encoder block's output token state
  (flax's capture_intermediates: {"encoderblock_i": {"__call__": (Tokens,)}}) for FRD, else None."""
  if not blocks:
    return (*teacher.apply(params, images), None)
  from tokcomp.models.vit import Encoder1DBlock
  (t_logits, t_aux), state = teacher.apply(
      params, images, capture_intermediates=lambda m, method: isinstance(m, Encoder1DBlock) and method == "__call__",
      mutable=["intermediates"])
  return t_logits, t_aux, state["intermediates"].get("Transformer", {})


def frd_loss(weight: float, sown, t_blocks, num_protected: int) -> jax.Array:
  """SiT's FRD token distillation (Zong et al. 2022 §3.2; its `DistillationLoss` with "frd"): over the blocks,
  the mean of the MSE between the student's block output mapped back to all N0 patches by its reverse TSM (sown
  into "distill" by `sit:...,frd=1`, `tokcomp/reducers/sit.py`) and the dense teacher's patch tokens after the
  same block, times `weight` (config.distill.frd, SiT's lambda_token)."""
  student = sown.get("Transformer", {})
  if not student:
    raise ValueError(f"config.distill.frd={weight}: FRD needs a reducer that sows every block's full-length "
                     "tokens in training (sit:...,frd=1); this model sows none")
  if set(student) != set(t_blocks):
    raise ValueError(f"config.distill.frd: the student sows tokens after blocks {sorted(student)} but the teacher "
                     f"gives {sorted(t_blocks)} (FRD compares every block; scan=False)")
  total = 0.0
  for name, sown_block in student.items():
    leaves = jax.tree_util.tree_leaves(sown_block)
    if len(leaves) != 1:
      raise ValueError(f"config.distill.frd: {name} sowed {len(leaves)} token arrays; FRD expects one per block")
    teacher_tokens = t_blocks[name]["__call__"][0].x[:, num_protected:]
    total += jnp.mean((leaves[0].astype(jnp.float32) - teacher_tokens.astype(jnp.float32)) ** 2)
  return weight * total / len(student)


def load_init(path: str, fresh):
  """Params for `config.init_from`: a train.py workdir (its latest checkpoint) or a timm / big_vision file."""
  from tokcomp import checkpoints
  if os.path.isdir(os.path.join(path, "ckpt")):
    loaded, _ = evaluation.restore_params(path)
  elif os.path.isfile(path):
    _, loaded = checkpoints.load(path)
  else:
    raise FileNotFoundError(f"config.init_from={path!r}: neither a train.py workdir (with ckpt/) nor a "
                            ".npz/.safetensors checkpoint file")
  from tokcomp.models.vit import match_block_layout  # a per-block checkpoint into a scan model, or back
  return checkpoints.common.overlay(fresh, match_block_layout(dict(loaded), dict(fresh)))


def _modules(leaves: list[str]) -> str:
  """'params/Transformer/encoderblock_1/sit/hidden/bias', ... -> '12 leaves in Transformer/encoderblock_1/sit, ...'."""
  mods = sorted({"/".join(k.split("/")[1:-1][:3]) or k for k in leaves})
  return f"{len(leaves)} leaves in " + ", ".join(mods)


def _truncate_metrics(path: str, last_step: int) -> None:
  """After a resume, drop the log rows past the restored step: they are about to be logged again."""
  if jax.process_index() or not os.path.exists(path):
    return
  with open(path) as f:
    rows = [l for l in f if l.strip() and json.loads(l)["step"] <= last_step]
  with open(path, "w") as f:
    f.writelines(rows)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  if os.environ.get("TOKCOMP_DISTRIBUTED"):  # first: any backend call (jax.process_count() too) makes it raise
    jax.distributed.initialize()
  train_and_evaluate(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
