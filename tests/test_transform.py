"""Token Transforming (`transform`): parity with a loop-based NumPy reference of its equations (no official code
exists; see tools/goldens/transform.md), the special cases of the matrix form (pruning == gather, hard
assignment == size-weighted merge), the transform's invariants, and clear errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import run_with_blocks
from helpers import assert_close, images, random_params, tiny_vit, tokens_and_signals
from tokcomp import reducers
from tokcomp.attention import Attention, Signals
from tokcomp.models.vit import MlpBlock
from tokcomp.ops.transform import dominant_slot, soft_reassign, transform_matrix
from tokcomp.reducers import transform


# --- the loop-based reference ------------------------------------------------------------------------------

def np_transform(x, size, mask, score, metric, protected, keep, topk, tau):
  """Steps 1-5 of tokcomp/reducers/transform.py for one example, with Python loops. Returns
  (x' [M, D], size' [M], dest [N] (new slot of each old slot, -1 if dropped), A [N, M])."""
  x, size, score, metric = (np.asarray(a, np.float64) for a in (x, size, score, metric))
  n = x.shape[0]
  k = int(np.ceil(keep * (n - protected)))
  # 1. Targets: the k most attentive valid reducible slots (ties to the lower slot), ascending.
  ranked = sorted(range(protected, n), key=lambda j: (not mask[j], -score[j] if mask[j] else 0.0, j))
  targets = list(range(protected)) + sorted(ranked[:k])
  m_out = len(targets)
  # 2. Cosine similarity to every target.
  unit = [metric[j] / max(np.linalg.norm(metric[j]), 1e-12) for j in range(n)]
  a = np.zeros((n, m_out))
  for j in range(n):
    if not mask[j]:
      continue
    if j in targets:
      a[j, targets.index(j)] = 1.0  # prefix and targets keep themselves
      continue
    cand = [m for m in range(protected, m_out) if mask[targets[m]]]
    cos = {m: float(unit[j] @ unit[targets[m]]) for m in cand}
    # 3. The topk most similar targets (ties to the lower target); 4. softmax(cos / tau) over them.
    best = sorted(cand, key=lambda m: (-cos[m], m))[:topk]
    e = {m: np.exp((cos[m] - max(cos[b] for b in best)) / tau) for m in best}
    for m in best:
      a[j, m] = e[m] / sum(e.values())
  # 5. Mass moves with A; each new token is the size-weighted mean of what it received.
  new_size = np.zeros(m_out)
  new_x = np.zeros((m_out, x.shape[1]))
  for m in range(m_out):
    for j in range(n):
      if mask[j]:
        new_size[m] += a[j, m] * size[j]
        new_x[m] += a[j, m] * size[j] * x[j]
    if new_size[m] > 0:
      new_x[m] /= new_size[m]
  dest = np.array([int(np.argmax(a[j])) if mask[j] and a[j].sum() > 0 else -1 for j in range(n)])
  return new_x, new_size, dest, a


def random_sizes(tokens, seed):
  sizes = np.random.default_rng(seed).integers(1, 5, tokens.size.shape).astype(np.float32)
  return tokens.replace(size=jnp.asarray(sizes))


CASES = [  # n, protected, keep, topk, tau, metric, masked tail
    (37, 1, 0.5, 3, 0.1, "keys", 0),
    (51, 2, 0.7, 1, 0.5, "x", 0),
    (41, 1, 0.1, 6, 1.0, "keys", 0),   # topk > k: spread over every target
    (37, 1, 0.3, 4, 0.05, "x", 7),     # some slots already invalid
]


@pytest.mark.parametrize("n,protected,keep_rate,topk,tau,metric,masked", CASES)
def test_matches_loop_reference(n, protected, keep_rate, topk, tau, metric, masked):
  tokens, signals = tokens_and_signals(batch=3, n=n, protected=protected, seed=n + topk)
  tokens = random_sizes(tokens, n)
  if masked:
    tokens = tokens.replace(mask=tokens.mask.at[:, -masked:].set(False))
  config = transform.TransformConfig(keep=keep_rate, topk=topk, tau=tau, metric=metric)
  out = jax.jit(lambda t, s: transform.reduce(t, s, config=config))(tokens, signals)
  score = np.asarray(signals.cls_attn).mean(1)
  feats = np.asarray(signals.keys_mean if metric == "keys" else tokens.x)
  for b in range(3):
    want_x, want_size, dest, _ = np_transform(tokens.x[b], tokens.size[b], np.asarray(tokens.mask[b]), score[b],
                                              feats[b], protected, keep_rate, topk, tau)
    assert out.n == len(want_size)
    assert_close(out.x[b], want_x, rtol=1e-5, atol=1e-5, err_msg=f"x row {b}")
    assert_close(out.size[b], want_size, rtol=1e-5, atol=1e-5, err_msg=f"size row {b}")
    np.testing.assert_array_equal(np.asarray(out.mask[b]), want_size > 0)
    np.testing.assert_array_equal(np.asarray(out.index[b]), dest)  # fresh state: original token == slot



def test_model_matches_reference_in_the_loop():
  """The ViT with `transform` at blocks 1 and 2 == the same blocks run module by module with the NumPy
  reducer in the mid slot and log-size attention from the next block on (logits and every block, 1e-5
  relative to the block's scale). 48 px / patch 8: 36 patches + CLS = 37 -> 27 -> 20 tokens."""
  spec = "transform:keep=0.7,layers=1-2,topk=3,tau=0.2"
  model = tiny_vit(reduce=spec, num_heads=2)
  params = random_params(model, image_hw=(48, 48), seed=3, std=0.1)
  x_img = images(batch=3, hw=(48, 48), seed=1)
  logits, aux, blocks = run_with_blocks(model, params, x_img)
  assert [b.n for b in blocks] == [37, 27, 20, 20]

  p = params["params"]["Transformer"]
  ln = lambda q, v: nn.LayerNorm(epsilon=1e-6).apply({"params": q}, v)
  x = np.asarray(blocks[0].x)  # fp32 state between blocks, as the model keeps it
  size = np.ones(x.shape[:2], np.float32)
  prop = False
  for i in range(1, model.depth):
    blk = p[f"encoderblock_{i}"]
    b_n = x.shape[1]
    mask = jnp.ones((3, b_n), bool)
    bias = jnp.asarray(np.log(size), jnp.float32) if prop else None
    y, sig = Attention(model.num_heads).apply({"params": blk["MultiHeadDotProductAttention_0"]},
                                              ln(blk["LayerNorm_0"], jnp.asarray(x)), mask, bias,
                                              signals=("cls_attn", "keys_mean"))
    x = x + np.asarray(y)
    if i in (1, 2):
      score, keys = np.asarray(sig.cls_attn).mean(1), np.asarray(sig.keys_mean)
      outs = [np_transform(x[b], size[b], np.ones(b_n, bool), score[b], keys[b], 1, 0.7, 3, 0.2)
              for b in range(3)]
      x, size = (np.stack([o[j] for o in outs]).astype(np.float32) for j in (0, 1))
      prop = True
    y = MlpBlock(model.mlp_dim).apply({"params": blk["MlpBlock_0"]}, ln(blk["LayerNorm_1"], jnp.asarray(x)))
    x = x + np.asarray(y)
    # fp32 through LayerNorm/MLP on activations of scale ~10: 1e-5 relative to the block's largest entry.
    assert_close(blocks[i].x, x, rtol=1e-5, atol=1e-5 * np.abs(x).max(), err_msg=f"block {i}")
  head = params["params"]["head"]
  pre = np.asarray(ln(p["encoder_norm"], jnp.asarray(x)))[:, 0]
  assert_close(logits, pre @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), rtol=1e-5, atol=1e-5,
               err_msg="logits")
  assert_close(aux["tokens"].size, size, rtol=1e-5, atol=1e-5, err_msg="final sizes")
  np.testing.assert_array_equal(np.asarray(aux["tokens"].size).sum(1), 37)  # conserved exactly


# --- the matrix form and its special cases -----------------------------------------------------------------

def test_one_hot_selection_equals_gather():
  tokens, _ = tokens_and_signals(batch=3, n=21, protected=1, seed=7)
  tokens = random_sizes(tokens, 7)
  keep = jnp.asarray([[0, 3, 4, 9, 17], [0, 1, 2, 5, 20], [0, 6, 11, 12, 19]])
  assign = (keep[:, None, :] == jnp.arange(21)[None, :, None]).astype(jnp.float32)  # [B, N, M] one-hot
  soft, hard = soft_reassign(tokens, assign), tokens.gather(keep)
  assert_close(soft.x, hard.x, rtol=0, atol=0)
  for field in ("size", "mask", "index"):
    np.testing.assert_array_equal(np.asarray(getattr(soft, field)), np.asarray(getattr(hard, field)), field)


def test_hard_assignment_equals_size_weighted_merge():
  tokens, _ = tokens_and_signals(batch=3, n=23, protected=1, seed=8)
  tokens = random_sizes(tokens, 8)
  rng = np.random.default_rng(8)
  dest = rng.integers(-1, 6, (3, 23))
  dest[:, 0] = 0
  dest[:, 1:7] = np.arange(1, 7)  # every new slot is hit
  assign = jax.nn.one_hot(jnp.asarray(dest), 7) * (jnp.asarray(dest) >= 0)[..., None]
  soft, hard = soft_reassign(tokens, assign), tokens.reassign(jnp.asarray(dest), 7)
  assert_close(soft.x, hard.x, rtol=1e-5, atol=1e-6)
  assert_close(soft.size, hard.size)
  for field in ("mask", "index"):
    np.testing.assert_array_equal(np.asarray(getattr(soft, field)), np.asarray(getattr(hard, field)), field)


def test_topk_one_is_hard_merge_into_most_similar_target():
  tokens, signals = tokens_and_signals(batch=3, n=37, protected=1, seed=9)
  tokens = random_sizes(tokens, 9)
  config = transform.TransformConfig(keep=0.4, topk=1)
  out = transform.reduce(tokens, signals, config=config)
  score, keys = np.asarray(signals.cls_attn).mean(1), np.asarray(signals.keys_mean)
  dest = np.zeros((3, 37), np.int32)
  for b in range(3):
    targets = [0] + sorted(np.argsort(-score[b, 1:], kind="stable")[:15] + 1)
    unit = keys[b] / np.linalg.norm(keys[b], axis=-1, keepdims=True)
    for j in range(37):
      dest[b, j] = targets.index(j) if j in targets else 1 + int(np.argmax(unit[targets[1:]] @ unit[j]))
  merged = tokens.reassign(jnp.asarray(dest), 16)
  assert_close(out.x, merged.x, rtol=1e-5, atol=1e-5)
  assert_close(out.size, merged.size)
  np.testing.assert_array_equal(np.asarray(out.index), np.asarray(merged.index))


def test_transform_matrix_invariants():
  tokens, signals = tokens_and_signals(batch=3, n=37, protected=1, seed=10)
  tokens = random_sizes(tokens, 10)
  config = transform.TransformConfig(keep=0.5, topk=3, tau=0.3)
  targets, assign = transform.assignment(tokens, signals.cls_attn.mean(1), signals.keys_mean, config)
  matrix, new_size = transform_matrix(assign, tokens.size, tokens.mask, tokens.num_original)
  a, t = np.asarray(assign), np.asarray(matrix)
  assert t.shape == (3, 19, 37) and (t >= 0).all()
  np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)        # every new token is a weighted mean
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-6)        # every source is moved whole
  np.testing.assert_array_equal(np.asarray(new_size).sum(1), np.asarray(tokens.size).sum(1))  # exactly
  assert_close(new_size, np.einsum("bnm,bn->bm", a, np.asarray(tokens.size)), rtol=1e-5, atol=1e-5)
  assert ((a > 0).sum(-1) <= 3).all()                           # top-k sparsity
  np.testing.assert_array_equal(t[:, 0], np.eye(37)[0][None].repeat(3, 0))  # the CLS row is the identity
  assert (a[:, 1:, 0] == 0).all()                               # nothing flows into the prefix
  assert ((a > 0).sum(-1) > 1).any() and ((a > 0).sum(1) > 2).any()  # many-to-many, not a partition
  # A target keeps itself whole; `index` is the dominant slot of each token.
  tg = np.asarray(targets)
  for b in range(3):
    np.testing.assert_array_equal(a[b, tg[b], np.arange(19)], 1.0)
  out = soft_reassign(tokens, assign)
  np.testing.assert_array_equal(np.asarray(out.index), np.asarray(dominant_slot(assign, tokens.mask)))
  np.testing.assert_array_equal(np.asarray(out.index), a.argmax(-1))


def test_index_composes_over_two_transforms():
  tokens, signals = tokens_and_signals(batch=2, n=37, protected=1, seed=11)
  config = transform.TransformConfig(keep=0.5, topk=2)
  first = transform.reduce(tokens, signals, config=config)
  _, s2 = tokens_and_signals(batch=2, n=first.n, protected=1, seed=12)
  _, assign = transform.assignment(first, s2.cls_attn.mean(1), s2.keys_mean, config)
  second = soft_reassign(first, assign)
  dest2 = np.asarray(assign).argmax(-1)
  np.testing.assert_array_equal(np.asarray(second.index), np.take_along_axis(dest2, np.asarray(first.index), 1))


# --- schedule, counts and errors ---------------------------------------------------------------------------

def test_schedule_counts_and_prop_attn():
  model = tiny_vit(reduce="transform:keep=0.7,layers=1-2")
  _, counts = model.plan((48, 48))
  assert [(c.n_attn, c.n_mlp) for c in counts] == [(37, 37), (37, 27), (27, 20), (20, 20)]
  assert model.flops((48, 48)) < tiny_vit().flops((48, 48))
  steps = reducers.build_schedule("transform:keep=0.7", 12)
  assert [i for i, s in enumerate(steps) if s] == [3, 6, 9]
  assert steps[3].config == transform.TransformConfig(keep=0.7, topk=4, tau=0.1, metric="keys", prop_attn=True)
  method = reducers.get("transform")
  assert method.prop_attn(steps[3].config)
  cfg = reducers.build_schedule("transform:keep=0.5,layers=0,topk=2,tau=1,metric=x,prop_attn=False", 1)[0].config
  assert (cfg.topk, cfg.tau, cfg.metric, cfg.prop_attn) == (2, 1.0, "x", False) and isinstance(cfg.tau, float)
  assert not method.prop_attn(cfg)
  assert reducers.build_schedule("transform:keep=1.0,layers=1", 4)[1] is not None
  assert tiny_vit(reduce="transform:keep=1.0,layers=1").plan((48, 48))[0][1] is None  # k = N - P: identity


def test_metric_x_needs_no_keys():
  tokens, signals = tokens_and_signals(batch=2, n=21, protected=1, seed=13)
  out = transform.reduce(tokens, signals.replace(keys_mean=None),
                         config=transform.TransformConfig(keep=0.5, metric="x"))
  assert out.n == 11 and np.isfinite(np.asarray(out.x)).all()


@pytest.mark.parametrize("spec,match", [
    ("transform", "argument keep is required"),
    ("transform:keep=1.5", r"transform keep=1.5: must be a rate in \(0, 1\]"),
    ("transform:keep=0", "must be a rate"),
    ("transform:keep=0.5,topk=0", "topk=0: must be an int >= 1"),
    ("transform:keep=0.5,topk=2.5", "topk=2.5: must be an int >= 1"),
    ("transform:keep=0.5,tau=0", "tau=0: must be a temperature > 0"),
    ("transform:keep=0.5,tau=-1.0", "tau=-1.0"),
    ("transform:keep=0.5,metric=values", r"metric='values': must be one of \('keys', 'x'\)"),
    ("transform:keep=0.5,prop_attn=1", "prop_attn=1: must be True or False"),
    ("transform:keep=0.5,r=3", "unknown argument"),
    ("transform:keep=0.5,layers=2-4", r"transform layers entry 4: must be a block index in \[0, 4\)"),
])
def test_bad_specs_fail_with_clear_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    reducers.build_schedule(spec, 4)


def test_missing_signals_fail_clearly():
  tokens, signals = tokens_and_signals(batch=2, n=21, protected=1)
  config = transform.TransformConfig(keep=0.5)
  with pytest.raises(ValueError, match="transform needs signals.cls_attn"):
    transform.reduce(tokens, Signals(keys_mean=signals.keys_mean), config=config)
  with pytest.raises(ValueError, match="metric='keys' needs signals.keys_mean"):
    transform.reduce(tokens, Signals(cls_attn=signals.cls_attn), config=config)


def test_direct_call_with_bad_config_fails_clearly():
  tokens, signals = tokens_and_signals(batch=2, n=21, protected=1)
  with pytest.raises(ValueError, match="transform topk=0: must be an int >= 1"):
    transform.reduce(tokens, signals, config=transform.TransformConfig(keep=0.5, topk=0))
  with pytest.raises(ValueError, match="transform metric='v': must be one of"):
    transform.reduce(tokens, signals, config=transform.TransformConfig(keep=0.5, metric="v"))


def test_soft_reassign_rejects_wrong_shape():
  tokens, _ = tokens_and_signals(batch=2, n=21, protected=1)
  with pytest.raises(ValueError, match=r"assign shape \(2, 20, 5\) must be \[B, N, M\]"):
    soft_reassign(tokens, jnp.zeros((2, 20, 5)))
