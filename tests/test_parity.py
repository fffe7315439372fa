"""Parity with the official ToMe and EViT code on identical weights (goldens in tests/goldens/, fp32, 1e-5).

The fixtures are made by tools/goldens/make_tome.py (facebookresearch/ToMe @ af95e4b on timm 1.0.31) and
tools/goldens/make_evit.py (youweiliang/evit @ 5ca95a7); see tools/goldens/README.md.
"""
import numpy as np
import pytest

from goldens_util import assert_same_rows, load, model_from_state, nhwc, run_with_blocks
from helpers import assert_close



def tome_spec(config):
  r = config["r"]
  if config["r_kind"] == "pair" or (isinstance(r, list) and len(r) == 2 and isinstance(r[1], float)):
    r = f"({r[0]}, {r[1]})"
  return f"tome:r={r},prop_attn={config['prop_attn']}"


@pytest.mark.parametrize("name", ["tome_cls50_r5", "tome_cls37_inflect", "tome_dist51_list", "tome_cls50_noprop",
                                  "tome_gap49_r6"])
def test_tome_matches_reference(name):
  config, state, g = load(name)
  model, params = model_from_state(state, num_heads=config["num_heads"], reduce=tome_spec(config))
  _, counts = model.plan((config["img_size"],) * 2)
  assert [c.n_mlp for c in counts] == list(g["tokens_per_layer"]), "token schedule differs from ToMe's"
  logits, aux, blocks = run_with_blocks(model, params, nhwc(g["input"]))
  assert_close(logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="logits")
  for i, t in enumerate(blocks):  # same order as ToMe: compare slot by slot
    assert_close(t.x, g[f"block_out/{i}"], rtol=1e-5, atol=1e-5, err_msg=f"block {i}")
  final = aux["tokens"]
  np.testing.assert_array_equal(np.asarray(final.source()), g["source"].astype(bool))
  assert_close(final.size, g["size"][..., 0])


@pytest.mark.parametrize("name", ["evit_fuse_50", "evit_nofuse_50", "evit_fuse_37"])
def test_evit_matches_reference(name):
  config, state, g = load(name)
  layers = [i for i, k in enumerate(config["keep_rate"]) if k < 1]
  keeps = {config["keep_rate"][i] for i in layers}
  spec = "+".join(f"evit:keep={k},layers={'-'.join(str(i) for i in layers if config['keep_rate'][i] == k)},"
                  f"fuse={config['fuse_token']}" for k in sorted(keeps))
  model, params = model_from_state(state, num_heads=config["num_heads"], reduce=spec)
  _, counts = model.plan((config["img_size"],) * 2)
  assert [c.n_mlp - 1 for c in counts] == list(g["tokens_per_layer"]), "token schedule differs from EViT's"
  logits, aux, blocks = run_with_blocks(model, params, nhwc(g["input"]))
  assert_close(logits, g["logits"], rtol=1e-5, atol=1e-5, err_msg="logits")
  for i, t in enumerate(blocks):
    ref = g[f"block_out/{i}"]
    for b in range(ref.shape[0]):  # EViT emits kept tokens by descending score, we keep slot order
      assert_close(t.x[b, 0], ref[b, 0], rtol=1e-5, atol=1e-5, err_msg=f"block {i} CLS")
      assert_same_rows(t.x[b], ref[b], what=f"block {i} sample {b}")
  first = layers[0]
  ours = np.sort(np.asarray(blocks[first].index)[:, 1:], axis=1)
  for b in range(ours.shape[0]):  # the first pruning keeps the same patch set (reference: positions - 1)
    kept = set((np.flatnonzero(np.asarray(blocks[first].index)[b, 1:] >= 0)).tolist())
    ref_kept = set(g[f"kept_idx/{first}"][b].tolist())
    if config["fuse_token"]:  # with fusion, dropped patches map to the fused slot: drop it from the set
      fused = blocks[first].n - 1
      kept = set(np.flatnonzero((np.asarray(blocks[first].index)[b, 1:] >= 0) &
                                (np.asarray(blocks[first].index)[b, 1:] != fused)).tolist())
    assert kept == ref_kept
