"""DiffRate at inference: parity with the official code, a loop-based NumPy reference of one block's reduction,
the authors' compression_rate.json format, and the count validation.

Goldens: tests/goldens/diffrate_*.npz, made by tools/goldens/make_diffrate.py from OpenGVLab/DiffRate @ 91ae3e3
(see tools/goldens/diffrate.md). tests/fixtures/diffrate_compression_rate.json holds three entries of the authors'
compression_rate.json (same commit), numbers and string format unchanged: ViT-T-DeiT 1.0, ViT-S-DeiT 2.5 and 2.9.
"""
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from goldens_util import load, model_from_state, nhwc, run_with_blocks
from helpers import assert_close, tokens_and_signals
from tokcomp import reducers
from tokcomp.models import vit
from tokcomp.reducers import diffrate

HERE = os.path.dirname(__file__)
FIXTURE = os.path.join(HERE, "fixtures", "diffrate_compression_rate.json")


# --- parity with the reference -----------------------------------------------------------------------------


def golden_input(g):
  if "input_u8" in g:  # the documented transform of tools/goldens/make_diffrate.py
    u8 = g["input_u8"]
    assert u8.dtype == np.uint8
    return (u8.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) * np.float32(0.5)
  return g["input"]


# The 12-block golden's residual stream grows to |x| ~ 15 (N(0, 0.3) weight noise, needed for CLS-score gaps
# over 196 tokens), and fp32 rounding then reaches ~1.6e-5 absolute (~1e-6 of the block's scale) on small
# entries: there, atol is 1e-5 of the block's largest |x| instead of 1e-5. Logits stay at 1e-5 / 1e-5.
SCALED_ATOL = {"diffrate_vits25_197"}


def spec_for(name, config):
  if config["published"]:
    model, flops = config["published"]
    return f"diffrate:schedule={FIXTURE},model={model},flops={flops}"  # the authors' format, clamp by default
  prune = "-".join(map(str, config["prune_kept_num"]))
  merge = "-".join(map(str, config["merge_kept_num"]))
  return f"diffrate:prune={prune},merge={merge},clamp={config['clamped']}"


@pytest.mark.parametrize("name", ["diffrate_cls50", "diffrate_cls37_clamp", "diffrate_vits25_197"])
def test_diffrate_matches_reference(name):
  config, state, g = load(name)
  spec = spec_for(name, config)
  steps = reducers.build_schedule(spec, config["depth"])
  assert [s.config.prune for s in steps] == list(g["prune_kept_num"])  # the fixture's numbers are the golden's
  assert [s.config.merge for s in steps] == list(g["merge_kept_num"])
  model, params = model_from_state(state, num_heads=config["num_heads"], reduce=spec)
  _, counts = model.plan((config["img_size"],) * 2)
  assert [c.n_mlp for c in counts] == list(g["tokens_per_layer"]), "token schedule differs from DiffRate's"
  logits, aux, blocks = run_with_blocks(model, params, nhwc(golden_input(g)))
  assert_close(logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="logits")
  for i, t in enumerate(blocks):  # the reference's order (descending CLS attention): slot by slot
    ref = g[f"block_out/{i}"]
    assert_close(t.x, ref, rtol=1e-5, atol=1e-5 * (np.abs(ref).max() if name in SCALED_ATOL else 1.0),
                 err_msg=f"block {i}")
    assert_close(t.size, g[f"size/{i}"], rtol=1e-5, atol=1e-5, err_msg=f"block {i} sizes")
  np.testing.assert_array_equal(np.asarray(aux["tokens"].source()), g["source"])
  assert float(g["min_margin"]) > 1e-4 and float(g["min_order_gap"]) > 1e-5  # the golden is not on a tie


def test_golden_sizes_are_similarity_weighted_not_counts():
  """The reference's merged sizes are not token counts, so the parity above pins size="similarity"."""
  _, _, g = load("diffrate_cls50")
  held = g["source"].sum(-1)  # original tokens per final slot (block 3 is the last)
  assert not np.allclose(g["size/3"], held)
  assert (g["size/3"] <= held + 1e-6).all()  # cos <= 1: a merged token adds at most its count


# --- one block against a loop-based NumPy reference ---------------------------------------------------------

def np_diffrate(x, size, cls_attn, prune, merge, protected, rule):
  """One block of DiffRate inference for one example, written from the paper/reference description with loops.
  Returns (x' [M, D], size' [M], new slot of every old slot (-1 dropped))."""
  n = x.shape[0]
  score = cls_attn.mean(0)
  order = list(range(protected)) + sorted(range(protected, n), key=lambda t: -score[t])  # stable
  kept = order[:min(n, prune)]
  m = min(len(kept), merge)
  dst, src = kept[:m], kept[m:]
  unit = x / np.linalg.norm(x, axis=-1, keepdims=True)
  total = [x[d].astype(np.float64).copy() for d in dst]
  members = [1] * m
  new_size = [float(size[d]) for d in dst]
  slot = np.full(n, -1)
  slot[dst] = np.arange(m)
  for i in src:
    sims = [-np.inf if j < protected else float(unit[i] @ unit[dst[j]]) for j in range(m)]
    j = int(np.argmax(sims))
    total[j] += x[i]
    members[j] += 1
    new_size[j] += (sims[j] if rule == "similarity" else 1.0) * float(size[i])
    slot[i] = j
  return np.stack([t / c for t, c in zip(total, members)]), np.array(new_size), slot


@pytest.mark.parametrize("n,protected,prune,merge,rule", [
    (37, 1, 30, 21, "similarity"), (37, 1, 37, 20, "count"), (37, 1, 25, 25, "similarity"),
    (41, 2, 33, 17, "similarity"), (26, 1, 26, 2, "count")])
def test_reduce_matches_loop_reference(n, protected, prune, merge, rule):
  tokens, signals = tokens_and_signals(batch=3, n=n, protected=protected, seed=n + prune)
  size = jnp.asarray(np.random.default_rng(n).integers(1, 4, (3, n)), jnp.float32)
  tokens = tokens.replace(size=size)
  config = diffrate.DiffRateConfig(prune, merge, size=rule)
  out = jax.jit(lambda t, s: diffrate.reduce(t, s, config=config))(tokens, signals)
  assert out.n == merge
  for b in range(3):
    want_x, want_size, slot = np_diffrate(np.asarray(tokens.x[b]), np.asarray(size[b]),
                                          np.asarray(signals.cls_attn[b]), prune, merge, protected, rule)
    assert_close(out.x[b], want_x, rtol=1e-5, atol=1e-6, err_msg=f"x row {b}")
    assert_close(out.size[b], want_size, rtol=1e-5, atol=1e-6, err_msg=f"size row {b}")
    np.testing.assert_array_equal(np.asarray(out.index[b]), slot)  # index was the identity
  if rule == "count":  # sizes still add up the original sizes of the tokens the slots hold
    np.testing.assert_allclose(np.asarray(out.size).sum(1),
                               np.where(np.asarray(out.index) >= 0, np.asarray(size), 0).sum(1))


def test_default_rule_compiles_once_and_rows_are_independent():
  """The contract test runs the example (size=count); this is the same for the default size=similarity."""
  step = reducers.build_schedule("diffrate:prune=33-29-25-21,merge=29-25-21-17", 4)[0]
  fn = jax.jit(chex.assert_max_traces(lambda t, s: reducers.apply(step, t, s), n=1))
  for seed in (0, 1):
    tokens, signals = tokens_and_signals(batch=3, n=37, protected=1, seed=seed)
    out = fn(tokens, signals)
    assert out.x.shape == (3, 29, 16) and np.isfinite(np.asarray(out.x)).all()
    assert_close(out.x[:, 0], tokens.x[:, 0])  # the CLS token is never merged into
    for b in range(3):
      one = reducers.apply(step, *jax.tree_util.tree_map(lambda a: a[b:b + 1], (tokens, signals)))
      assert_close(one.x[0], out.x[b])
      assert_close(one.size[0], out.size[b])
      np.testing.assert_array_equal(one.index[0], out.index[b])
  chex.clear_trace_counter()


def test_masked_slots_rank_last_and_take_no_part():
  tokens, signals = tokens_and_signals(batch=2, n=21, protected=1, seed=7)
  mask = np.ones((2, 21), bool)
  mask[:, 16:] = False  # 15 valid reducible slots
  tokens = tokens.replace(mask=jnp.asarray(mask), index=jnp.where(jnp.asarray(mask), tokens.index, -1))
  out = jax.jit(lambda t, s: diffrate.reduce(t, s, config=diffrate.DiffRateConfig(18, 10)))(tokens, signals)
  assert np.asarray(out.mask).all()
  assert (np.asarray(out.index)[:, 16:] == -1).all()
  np.testing.assert_array_equal((np.asarray(out.index) >= 0).sum(1), 16)  # every valid token is held


# --- the authors' schedule format ---------------------------------------------------------------------------

def published(model, flops):
  entry = json.load(open(FIXTURE))[model][flops]
  return tuple(json.loads(entry["prune_kept_num"])), tuple(json.loads(entry["merge_kept_num"]))


def test_load_schedule_reads_the_authors_format():
  counts = diffrate.load_schedule(FIXTURE, "ViT-S-DeiT", 2.9)
  assert counts == published("ViT-S-DeiT", "2.9")
  assert counts.prune[0] == counts.merge[0] == 197 and counts.merge[-1] == 3 and len(counts.prune) == 12
  assert diffrate.load_schedule(FIXTURE, "ViT-T-DeiT", 1) == published("ViT-T-DeiT", "1.0")  # 1 finds "1.0"
  assert diffrate.load_schedule(FIXTURE, "ViT-T-DeiT") == published("ViT-T-DeiT", "1.0")  # its only entry


def test_load_schedule_other_shapes(tmp_path):
  one = tmp_path / "entry.json"
  one.write_text(json.dumps({"prune_kept_num": [50, 40], "merge_kept_num": "[45,30]"}))
  assert diffrate.load_schedule(one) == ((50, 40), (45, 30))
  merge_only = tmp_path / "caformer_like.json"  # the authors' CAFormer entries have "None" prune counts
  merge_only.write_text(json.dumps({"M": {"5.2": {"prune_kept_num": "None", "merge_kept_num": "[50,44,30]"}}}))
  counts = diffrate.load_schedule(merge_only)
  assert counts == (None, (50, 44, 30))
  steps = diffrate.schedule(counts)
  assert [(s.config.prune, s.config.merge) for s in steps] == [(None, 50), (None, 44), (None, 30)]


@pytest.mark.parametrize("kwargs,match", [
    ({}, r"pass model= one of \['ViT-S-DeiT', 'ViT-T-DeiT'\]"),
    ({"model": "ViT-B-DeiT"}, r"model='ViT-B-DeiT' not in the file; valid: \['ViT-S-DeiT', 'ViT-T-DeiT'\]"),
    ({"model": "ViT-S-DeiT"}, r"pass flops= one of \['2.5', '2.9'\]"),
    ({"model": "ViT-S-DeiT", "flops": 3.1}, r"flops=3.1 not in the file; valid: \['2.5', '2.9'\]"),
])
def test_load_schedule_names_the_choices(kwargs, match):
  with pytest.raises(ValueError, match=match):
    diffrate.load_schedule(FIXTURE, **kwargs)


def test_bad_entry_names_the_field(tmp_path):
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"M": {"1": {"prune_kept_num": "[197,0]", "merge_kept_num": "[197,90]"}}}))
  with pytest.raises(ValueError, match=r"model 'M' flops '1': diffrate prune\[1\]=0: must be an int >= 1"):
    diffrate.load_schedule(bad)


def test_spec_from_file_equals_inline_counts():
  prune, merge = published("ViT-S-DeiT", "2.9")
  from_file = reducers.build_schedule(f"diffrate:schedule={FIXTURE},model=ViT-S-DeiT,flops=2.9", 12)
  inline = reducers.build_schedule(f"diffrate:prune={'-'.join(map(str, prune))},"
                                   f"merge={'-'.join(map(str, merge))},clamp=True", 12)
  as_list = reducers.build_schedule(f"diffrate:prune={list(prune)},merge={list(merge)},clamp=True", 12)
  assert from_file == inline == as_list == diffrate.schedule((prune, merge), clamp=True)


def deit(depth=12, patch=16, **kw):
  return vit.ViT(num_classes=10, patch_size=(patch, patch), width=64, depth=depth, mlp_dim=128, num_heads=2, **kw)


def test_published_counts_follow_the_reference_min_rule():
  """ViT-T-DeiT 1.0 has prune[7]=164 and merge[7]=156 after block 6 left 148 tokens: the reference slices
  x[:, :164] (no-op) and merges down to 156 (no-op), i.e. N' = min(N, prune, merge) (its FLOP count's ste_min)."""
  prune, merge = published("ViT-T-DeiT", "1.0")
  model = deit(reduce=f"diffrate:schedule={FIXTURE},model=ViT-T-DeiT,flops=1.0")
  steps, counts = model.plan((224, 224))
  n, want = 197, []
  for p, m in zip(prune, merge):
    n = min(n, p, m)
    want.append(n)
  assert [c.n_mlp for c in counts] == want == [197, 197, 196, 190, 186, 154, 148, 148, 145, 135, 125, 21]
  assert [c.n_attn for c in counts] == [197] + want[:-1]
  assert all(s is not None for s in steps)  # every block sorts by CLS attention, as the reference


# --- validation ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,match", [
    ("diffrate", "give prune and/or merge counts"),
    ("diffrate:prune=50-43-40", "prune has 3 counts: must have one per block, depth=4"),
    ("diffrate:prune=50-43-40-30,merge=50-40", "merge has 2 counts"),
    ("diffrate:prune=50-43-44-30", r"prune\[2\]=44 > 43 tokens left by block 1: counts must be non-increasing"),
    ("diffrate:prune=50-43-40-30,merge=50-44-40-30", r"merge\[1\]=44 > prune\[1\]=43"),
    ("diffrate:merge=50-40-42-30", r"merge\[2\]=42 > 40 tokens left by block 1"),
    ("diffrate:prune=50-43-x-30", "must be ints joined by '-'"),
    ("diffrate:prune=50-43-0-0", r"prune\[2\]=0: must be an int >= 1"),
    ("diffrate:prune=50-43-40-30,size=sizes", "size='sizes': must be one of"),
    ("diffrate:prune=50-43-40-30,clamp=1", "clamp=1: must be True or False"),
    ("diffrate:prune=50-43-40-30,flops=2.9", "also pass schedule=PATH"),
    (f"diffrate:schedule={FIXTURE},prune=50-43-40-30", "not both"),
    ("diffrate:prune=50-43-40-30,foo=1", "unknown argument"),
])
def test_bad_specs_fail_with_clear_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    reducers.build_schedule(spec, 4)


def test_inline_counts_are_strict_but_files_clamp_by_default():
  prune, merge = published("ViT-S-DeiT", "2.5")  # prune[6]=111 > merge[5]=107 in the authors' own file
  inline = f"diffrate:prune={'-'.join(map(str, prune))},merge={'-'.join(map(str, merge))}"
  with pytest.raises(ValueError, match=r"prune\[6\]=111 > 107 tokens left by block 5.*clamp=True"):
    reducers.build_schedule(inline, 12)
  with pytest.raises(ValueError, match=r"prune\[6\]=111"):
    reducers.build_schedule(f"diffrate:schedule={FIXTURE},model=ViT-S-DeiT,flops=2.5,clamp=False", 12)
  assert reducers.build_schedule(inline + ",clamp=True", 12) == reducers.build_schedule(
      f"diffrate:schedule={FIXTURE},model=ViT-S-DeiT,flops=2.5", 12)


@pytest.mark.parametrize("spec,match", [
    # a 197-token schedule on a 50-token model (56 px / 8)
    ("diffrate:prune=197-190-180-170,clamp=True", "count of 197 but only 50 tokens enter the encoder"),
    ("diffrate:prune=60-50-40-30", "count of 60 but only 50 tokens"),
    ("diffrate:prune=50-43-40-1", r"diffrate at block 3: diffrate prune\[3\]=1 must be > 1"),
    ("diffrate:prune=50-43-40-30,merge=50-43-40-1", r"diffrate at block 3: diffrate merge\[3\]=1 must be > 1"),
])
def test_counts_must_fit_the_model(spec, match):
  with pytest.raises(ValueError, match=match):
    deit(depth=4, patch=8, reduce=spec).plan((56, 56))

def test_needs_a_class_token_and_the_signal():
  model = vit.ViT(num_classes=10, patch_size=(8, 8), width=64, depth=2, mlp_dim=128, num_heads=2,
                  class_token=False, pool="gap", reduce="diffrate:prune=49-40")
  with pytest.raises(ValueError, match="needs a class token"):
    model.plan((56, 56))
  tokens, signals = tokens_and_signals(batch=2, n=21, protected=1)
  with pytest.raises(ValueError, match="needs signals.cls_attn"):
    diffrate.reduce(tokens, signals.replace(cls_attn=None), config=diffrate.DiffRateConfig(20, 10))
  with pytest.raises(ValueError, match=r"diffrate block 0: merge=15 exceeds prune=12"):
    diffrate.reduce(tokens, signals, config=diffrate.DiffRateConfig(12, 15))
