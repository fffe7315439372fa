"""MCTF (tokcomp/reducers/mctf.py): parity with the official code (goldens from tools/goldens/make_mctf.py,
mlvlab/MCTF @ 2004da0, fp32, 1e-5), plus loop-based references of the criteria, the two-way matching and the
fused attention, the count rule, the block slots, and the errors."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import nhwc, run_with_blocks
from helpers import assert_close, images, random_params, tiny_vit, tokens_and_signals
from tokcomp import checkpoints, reducers
from tokcomp.attention import Signals
from tokcomp.ops.scored_matching import scored_bipartite_matching
from tokcomp.reducers import mctf

GOLDENS = os.path.join(os.path.dirname(__file__), "goldens")
CASES = ["mctf_ahead_cls50", "mctf_precise_cls37", "mctf_off_cls50", "mctf_mean_noprop_cls50", "mctf_max_cls50"]


# --- parity with the reference ---------------------------------------------------------------------------------

def load_case(name):
  shared = np.load(os.path.join(GOLDENS, "mctf_params.npz"))
  g = np.load(os.path.join(GOLDENS, name + ".npz"), allow_pickle=False)
  state = {k[len("param/"):]: shared[k].astype(np.float32) for k in shared.files}
  state.update({k[len("param/"):]: g[k] for k in g.files if k.startswith("param/")})
  return json.loads(str(g["config"])), state, g


def spec_of(c):
  """The reference's options (mctf_type, activate_layer, r_eval) as a tokcomp config string."""
  return (f"mctf:r={c['r']},layers={'-'.join(map(str, c['activate_layer']))},one_step_ahead={c['one_step_ahead']},"
          f"tau_sim={c['tau_sim']},tau_info={c['tau_info']},tau_size={c['tau_size']},"
          f"bidirection={bool(c['bidirection'])},pooling={c['pooling_type']},prop_attn={bool(c['prop_attn'])}")



@pytest.mark.parametrize("name", CASES)
def test_mctf_matches_reference(name):
  config, state, g = load_case(name)
  model, params = checkpoints.load(state, num_heads=config["num_heads"], reduce=spec_of(config))
  _, counts = model.plan((config["img_size"],) * 2)
  ins = [config["tokens_in"]] + list(g["tokens_per_layer"][:-1])
  assert [c.n_attn for c in counts] == [
      n - r if config["one_step_ahead"] else n for n, r in zip(ins, g["r_applied"])], "token schedule differs"
  logits, aux, blocks = run_with_blocks(model, params, nhwc(g["input"]))
  assert_close(logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="logits")
  for i, t in enumerate(blocks):  # same token order as the reference: slot by slot
    assert t.x.shape == g[f"block_out/{i}"].shape, f"block {i}"
    assert_close(t.x, g[f"block_out/{i}"], rtol=1e-5, atol=1e-5, err_msg=f"block {i}")
  final = aux["tokens"]
  np.testing.assert_array_equal(np.asarray(final.source()), g["source"] > 0)
  assert_close(final.size, g["size"][..., 0])


def test_goldens_cover_the_reference_options():
  seen = {k: set() for k in ("one_step_ahead", "pooling_type", "bidirection", "prop_attn")}
  for name in CASES:
    config, _, g = load_case(name)
    for k in seen:
      seen[k].add(config[k])
    assert config["min_margin"] > 1e-4 and config["reference_commit"].startswith("2004da0")
  assert seen == {"one_step_ahead": {0, 1, 2}, "pooling_type": {0, 1, 2, 3}, "bidirection": {0, 1},
                  "prop_attn": {0, 1}}


# --- criteria ----------------------------------------------------------------------------------------------------

def np_scores(x, attn, size, tau_sim, tau_info, tau_size):
  """The §3.2 criteria, one example, loops over edges: x [N, D], attn [H, N, N], size [N]."""
  n = x.shape[0]
  m = x / np.linalg.norm(x, axis=-1, keepdims=True)
  inv_a = 1 / attn.mean(axis=(0, 1))
  inv_a = inv_a / inv_a.max()
  inv_s = (1 / size) / (1 / size).max()
  out = np.zeros(((n + 1) // 2, n // 2))
  for i, p in enumerate(range(0, n, 2)):
    for j, q in enumerate(range(1, n, 2)):
      w = ((m[p] @ m[q] + 1) / 2) ** (1 / tau_sim) if tau_sim else 1.0
      w *= (inv_a[p] * inv_a[q]) ** (1 / tau_info) if tau_info else 1.0
      w *= (inv_s[p] * inv_s[q]) ** (1 / tau_size) if tau_size else 1.0
      out[i, j] = w
  return out


@pytest.mark.parametrize("taus", [(1, 20, 40), (2, 10, 0), (0, 5, 3), (1, 0, 0)])
def test_multi_criteria_scores_match_loop_reference(taus):
  tokens, signals = tokens_and_signals(batch=2, n=21, seed=1)
  size = jnp.asarray(np.random.default_rng(0).integers(1, 6, (2, 21)), jnp.float32)
  tokens = tokens.replace(size=size)
  config = mctf.MCTFConfig(r=3, tau_sim=taus[0], tau_info=taus[1], tau_size=taus[2])
  received = mctf.received_attention(signals.attn, tokens.mask)
  w = mctf.multi_criteria_scores(tokens, received, config)
  for b in range(2):
    want = np_scores(np.asarray(tokens.x[b], np.float64), np.asarray(signals.attn[b], np.float64),
                     np.asarray(size[b], np.float64), *taus)
    assert_close(w[b], want, rtol=2e-5, atol=1e-6)


def test_informative_and_small_tokens_score_higher():
  """Same features everywhere: the edge score falls as the tokens receive more attention or grow larger."""
  b, n, h = 1, 9, 2
  x = jnp.ones((b, n, 4))
  received = jnp.linspace(0.05, 0.2, n)[None]  # token n receives more attention as n grows
  attn = jnp.broadcast_to(received[:, None, None, :], (b, h, n, n)) / received.sum()
  tokens = mctf.Tokens.create(x, 1)
  w = mctf.multi_criteria_scores(tokens, mctf.received_attention(attn, tokens.mask), mctf.MCTFConfig(r=1))
  assert (np.diff(np.asarray(w[0]), axis=0) < 0).all() and (np.diff(np.asarray(w[0]), axis=1) < 0).all()
  tokens = tokens.replace(size=jnp.arange(1.0, n + 1)[None])
  flat = jnp.full((b, h, n, n), 1.0 / n)
  w = mctf.multi_criteria_scores(tokens, mctf.received_attention(flat, tokens.mask), mctf.MCTFConfig(r=1))
  assert (np.diff(np.asarray(w[0]), axis=0) < 0).all() and (np.diff(np.asarray(w[0]), axis=1) < 0).all()


# --- matching ----------------------------------------------------------------------------------------------------

def np_matching(s, r, protected, bidirectional):
  """Loop-based two-way bipartite matching on one score matrix s [Na, Nb]; returns the new slot of every slot."""
  na, nb = s.shape
  n = na + nb
  a_pos, b_pos = list(range(0, n, 2)), list(range(1, n, 2))
  blocked = lambda p: p < protected
  s = np.array([[-np.inf if blocked(a_pos[i]) or blocked(b_pos[j]) else s[i, j] for j in range(nb)]
                for i in range(na)])
  r1, r2 = (r // 2, r - r // 2) if bidirectional else (r, 0)
  best1 = [max(s[i]) for i in range(na)]
  order1 = sorted(range(na), key=lambda i: (blocked(a_pos[i]), -best1[i], i))
  merged1 = set(order1[:r1])
  to_b = {i: int(np.argmax(s[i])) for i in merged1}
  unm_a = [i for i in (range(na) if protected else order1) if i not in merged1 and not blocked(a_pos[i])]
  merged2, to_a = set(), {}
  if bidirectional:
    open_a = [i for i in range(na) if i not in merged1]
    best2 = [max(s[i, j] for i in open_a) for j in range(nb)]
    order2 = sorted(range(nb), key=lambda j: (blocked(b_pos[j]), -best2[j], j))
    merged2 = set(order2[:r2])
    to_a = {j: open_a[int(np.argmax([s[i, j] for i in open_a]))] for j in merged2}
    unm_b = [j for j in order2 if j not in merged2 and not blocked(b_pos[j])]
  else:
    unm_b = [j for j in range(nb) if not blocked(b_pos[j])]
  new = list(range(protected)) + [a_pos[i] for i in unm_a] + [b_pos[j] for j in unm_b]
  slot = {p: k for k, p in enumerate(new)}
  dest = []
  for p in range(n):
    if blocked(p):
      dest.append(p)
    elif p % 2 == 0:
      i = p // 2
      if i in merged1:
        j = to_b[i]
        dest.append(slot[a_pos[to_a[j]]] if j in merged2 else slot[b_pos[j]])
      else:
        dest.append(slot[p])
    else:
      j = p // 2
      dest.append(slot[a_pos[to_a[j]]] if j in merged2 else slot[p])
  return np.array(dest)


@pytest.mark.parametrize("n,r,protected,bidirectional", [
    (37, 5, 1, True), (50, 12, 1, True), (50, 12, 1, False), (51, 7, 2, True), (20, 6, 0, True),
    (21, 9, 0, False), (41, 20, 1, True), (12, 1, 1, True)])
def test_matching_matches_loop_reference(n, r, protected, bidirectional):
  rng = np.random.default_rng(n + r)
  scores = rng.uniform(size=(3, (n + 1) // 2, n // 2)).astype(np.float32)
  dest = scored_bipartite_matching(jnp.asarray(scores), jnp.ones((3, n), bool), r, protected, bidirectional)
  for b in range(3):
    want = np_matching(scores[b], r, protected, bidirectional)
    np.testing.assert_array_equal(np.asarray(dest[b]), want)
    assert sorted(set(want.tolist())) == list(range(n - r))  # every new slot holds something
    np.testing.assert_array_equal(want[:protected], np.arange(protected))


def test_matching_never_touches_invalid_or_protected_slots():
  n, r = 21, 4
  scores = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 11, 10)), jnp.float32)
  mask = np.ones((2, n), bool)
  mask[:, 15:] = False
  dest = np.asarray(scored_bipartite_matching(scores, jnp.asarray(mask), r, 1, True))
  for b in range(2):
    merged = [p for p in range(n) if np.sum(dest[b] == dest[b, p]) > 1]
    assert merged and all(p >= 1 and mask[b, p] for p in merged)


# --- fusion ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pooling", ["attn", "size", "mean", "max"])
def test_fusion_and_fused_attention_match_loop_reference(pooling):
  tokens, signals = tokens_and_signals(batch=2, n=23, seed=7)
  tokens = tokens.replace(size=jnp.asarray(np.random.default_rng(1).integers(1, 4, (2, 23)), jnp.float32))
  config = mctf.MCTFConfig(r=6, pooling=pooling)
  out, fused = mctf.reduce(tokens, signals, config=config, fuse_attention=True)
  x, size, attn, idx = (np.asarray(a, np.float64) for a in (tokens.x, tokens.size, signals.attn, out.index))
  received = attn.mean(axis=(1, 2))
  for b in range(2):
    groups = [np.flatnonzero(idx[b] == g) for g in range(out.n)]
    w = {"attn": received[b] * size[b] / size[b].max(), "size": size[b], "mean": np.ones(23)}.get(pooling)
    for g, members in enumerate(groups):
      want = x[b, members].max(0) if pooling == "max" else (w[members, None] * x[b, members]).sum(0) / w[members].sum()
      assert_close(out.x[b, g], want, rtol=1e-5, atol=1e-6, err_msg=f"x slot {g}")
      assert_close(out.size[b, g], size[b, members].sum())
      cols = np.stack([attn[b][:, members][:, :, m].sum(-1) for m in groups], -1)  # [H, |g|, N']: keys summed
      rows = cols.max(1) if pooling == "max" else (w[members, None, None] * cols.transpose(1, 0, 2)).sum(0) / w[
          members].sum()
      assert_close(fused[b, :, g], rows, rtol=1e-5, atol=1e-6, err_msg=f"attention row {g}")
  if pooling != "max":  # a weighted mean of probability rows is a probability row
    assert_close(jnp.sum(fused, -1), jnp.ones(fused.shape[:-1]), rtol=1e-5, atol=1e-5)


def test_precise_and_off_modes_return_no_fused_attention():
  tokens, signals = tokens_and_signals(batch=2, n=23, seed=2)
  for osa in (0, 2):
    out, fused = mctf.reduce(tokens, signals, config=mctf.MCTFConfig(r=4, one_step_ahead=osa),
                             fuse_attention=True)
    assert fused is None and out.n == 19


# --- count rule, schedule and block slots ------------------------------------------------------------------------

@pytest.mark.parametrize("r,n,want", [(16, 197, 16), (0.35, 197, 68), (12, 14, 4), (8, 17, 7), (5, 11, 1),
                                      (5, 10, 0), (0.35, 10, 0), (30, 37, 18)])
def test_merge_count_follows_the_reference(r, n, want):
  assert mctf.merge_count(mctf.MCTFConfig(r=r), n, 1) == want


def test_schedule_slots_and_counts():
  steps = reducers.build_schedule("mctf:r=16", 12)
  assert steps[0] is None and all(s.slot == "ahead" for s in steps[1:])
  steps = reducers.build_schedule("mctf:r=0.35,layers=3-6-9,one_step_ahead=0,pooling=0", 12)
  assert [i for i, s in enumerate(steps) if s] == [3, 6, 9] and steps[3].slot == "post"
  assert steps[3].config.pooling == "size"
  model = tiny_vit(reduce="mctf:r=6,layers=1-2,one_step_ahead=0")
  _, counts = model.plan((56, 56))
  assert [(c.n_attn, c.n_mlp) for c in counts] == [(50, 50), (50, 50), (44, 44), (38, 38)]
  model = tiny_vit(reduce="mctf:r=6,layers=1-2")
  _, counts = model.plan((56, 56))
  assert [(c.n_attn, c.n_mlp) for c in counts] == [(50, 50), (44, 44), (38, 38), (38, 38)]
  assert model.flops((56, 56)) < tiny_vit().flops((56, 56))


def test_mctf_that_merges_nothing_leaves_no_step():
  """r capped to 0 everywhere (N - r < 10 with N = 10 tokens): no block runs a reducer, in every mode."""
  for osa in (0, 1, 2):
    steps, counts = tiny_vit(reduce=f"mctf:r=2,one_step_ahead={osa}").plan((24, 24))  # 9 patches + CLS
    assert steps == (None,) * 4 and all((c.n_attn, c.n_mlp) == (10, 10) for c in counts)


def test_modes_differ_only_in_the_attention_after_the_merge():
  """Modes 1 and 2 merge the same tokens in the first active block and then differ (fused vs recomputed
  attention); the token bookkeeping of that block is identical."""
  x = images(batch=2)
  params = random_params(tiny_vit())
  outs = {}
  for osa in (1, 2):
    model = tiny_vit(reduce=f"mctf:r=5,layers=1,one_step_ahead={osa}")
    logits, _, blocks = run_with_blocks(model, params, x)
    outs[osa] = (logits, blocks[1])
  np.testing.assert_array_equal(np.asarray(outs[1][1].index), np.asarray(outs[2][1].index))
  assert_close(outs[1][1].size, outs[2][1].size)
  assert not np.allclose(np.asarray(outs[1][0]), np.asarray(outs[2][0]), atol=1e-6)


# --- errors ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("mctf", "argument r is required"),
    ("mctf:r=0", r"mctf r=0: must be an int >= 1"),
    ("mctf:r=-2", "must be an int >= 1"),
    ("mctf:r=1.5", "or a rate in \\(0, 1\\)"),
    ("mctf:r=True", "must be an int >= 1"),
    ("mctf:r=4,one_step_ahead=3", "one_step_ahead=3: must be 0"),
    ("mctf:r=4,tau_info=-1", "tau_info=-1: must be a number >= 0"),
    ("mctf:r=4,pooling=median", "pooling='median': must be one of"),
    ("mctf:r=4,pooling=4", "pooling=4: must be one of"),
    ("mctf:r=4,layers=0-4", r"mctf layers entry 4: must be a block index in \[0, 4\)"),
    ("mctf:r=4,foo=1", "unknown argument"),
])
def test_bad_specs_fail_with_clear_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    reducers.build_schedule(spec, 4)


def test_missing_or_wrong_attention_signal_fails():
  tokens, signals = tokens_and_signals(batch=2, n=21)
  config = mctf.MCTFConfig(r=3)
  with pytest.raises(ValueError, match="mctf needs signals.attn"):
    mctf.reduce(tokens, Signals(cls_attn=signals.cls_attn), config=config)
  with pytest.raises(ValueError, match=r"must be \[B, H, N, N\] for N=21"):
    mctf.reduce(tokens, signals.replace(attn=signals.attn[:, :, :20, :20]), config=config)
  with pytest.raises(ValueError, match=r"matching r=11: must be in \[0, 10\]"):
    scored_bipartite_matching(jnp.zeros((2, 11, 10)), tokens.mask, 11, 1, True)
