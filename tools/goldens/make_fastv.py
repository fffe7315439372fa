"""Golden fixtures for FastV (tokcomp/vlm/fastv.py) inside tokcomp's Llama decoder (tokcomp/models/llm.py).

Reference: pkunlp-icler/FastV, commit d1659729b5bf1be225e99ee15783deeea80f63b1 (no licence file at the root; the
logic sits in its vendored HF transformers 4.31.0, Apache-2.0; run only, nothing copied). What runs: the vendored
`LlamaForCausalLM` with the FastV config fields (`use_fast_v`, `fast_v_inplace`, `fast_v_sys_length`,
`fast_v_image_token_length`, `fast_v_attention_rank`, `fast_v_agg_layer`) set before construction, called as
`model.model(inputs_embeds=..., use_cache=False, output_attentions=True, output_hidden_states=True)` in float32 on
CPU under no_grad. See tools/goldens/fastv.md.

Model: hidden 64, 4 heads, 2 kv heads, 4 layers, MLP 128, vocab 128, RMSNorm eps 1e-6, theta 10000 (4.31's fixed
base), `initializer_range=0.1` plus N(0, 0.05) noise on every parameter (seeded). Sequence: 5 system + 49 image +
7 text = 61 tokens of N(0, 1) input embeddings. Each of 3 samples runs alone (batch 1: the reference ranks batch
element 0 only); the arrays are stacked.

Cases (tests/goldens/<case>.npz):
  fastv_k2_keep20   K = 2, attention rank 20 (the "keep=20" spec)
  fastv_k1_r05      K = 1, rank round(49 * (1 - 0.5)) = 24 (the "ratio=0.5" spec; 24.5 rounds to even)
Saved: param/<LlamaForCausalLM state-dict key>, hf_config (config.json text of the model), embeds [3, 61, 64],
attn_row [3, 4, 61] (layer K-1's softmax attention row of the last query, per head), hidden_k [3, 61, 64] (hidden
states entering layer K, before the prune), keep [3, S'] (kept slots, ascending), hidden [3, S', 64] (inplace
mode's final-normed hidden states), hidden_mask_mode [3, 61, 64] (mask mode, all slots; equal to `hidden` on the
kept slots), min_margin (smallest relative gap at the top-k cut), config (JSON).

Dependencies (separate --target dir; the vendored transformers checks them at import):
  /work/venv-torch/bin/pip install --no-deps --target /work/refs/pydeps-fastv "huggingface_hub>=0.14.1,<0.20" \
      "tokenizers>=0.11.1,<0.14" regex requests urllib3 certifi charset_normalizer
Command (repo root):
  PYTHONPATH=/work/refs/FastV/src/transformers/src:/work/refs/pydeps-fastv \
      /work/venv-torch/bin/python tools/goldens/make_fastv.py --out tests/goldens
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

COMMIT = "d1659729b5bf1be225e99ee15783deeea80f63b1"
SEED = 0
NOISE = 0.05
SYS, IMG, TXT = 5, 49, 7
CASES = {"fastv_k2_keep20": (2, 20), "fastv_k1_r05": (1, round(IMG * (1 - 0.5)))}


def build(agg_layer, rank, inplace):
  import transformers
  cfg = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
      num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=256, initializer_range=0.1,
      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  cfg.use_fast_v, cfg.fast_v_inplace = True, inplace
  cfg.fast_v_sys_length, cfg.fast_v_image_token_length = SYS, IMG
  cfg.fast_v_attention_rank, cfg.fast_v_agg_layer = rank, agg_layer
  common.set_deterministic(SEED)
  model = transformers.LlamaForCausalLM(cfg).eval()
  common.perturb_parameters(model, NOISE, SEED + 1)
  return model, cfg


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="tests/goldens")
  args = ap.parse_args()
  common.register_torchvision_nms_stub()
  import torch
  import transformers
  assert transformers.__version__.startswith("4.31"), f"expected the vendored 4.31, got {transformers.__version__}"

  gen = torch.Generator().manual_seed(SEED + 2)
  embeds = torch.randn(3, SYS + IMG + TXT, 64, generator=gen)
  for case, (k, rank) in CASES.items():
    model, cfg = build(k, rank, inplace=True)
    mask_model, _ = build(k, rank, inplace=False)
    sd = {n: v.detach().numpy().copy() for n, v in model.state_dict().items()}
    assert all(np.array_equal(sd[n], v.detach().numpy()) for n, v in mask_model.state_dict().items())
    margins = common.MarginLog()
    rows, hk, keeps, hid, hid_mask = [], [], [], [], []
    with torch.no_grad():
      for i in range(3):
        out = model.model(inputs_embeds=embeds[i:i + 1], use_cache=False, output_attentions=True,
                          output_hidden_states=True, return_dict=True)
        row = out.attentions[k - 1][0, :, -1]  # [H, S] at full length (layers < K are unpruned)
        score = row.mean(0)[SYS:SYS + IMG]
        order = torch.sort(score, descending=True).values.numpy()
        margins.add(f"sample{i}", common.topk_cut_gap(order, rank))
        keep = torch.cat([torch.arange(SYS), score.topk(rank).indices + SYS,
                          torch.arange(SYS + IMG, SYS + IMG + TXT)]).sort().values
        assert out.last_hidden_state.shape[1] == len(keep)
        rows.append(row.numpy()), hk.append(out.hidden_states[k][0].numpy()), keeps.append(keep.numpy())
        hid.append(out.last_hidden_state[0].numpy())
        hid_mask.append(mask_model.model(inputs_embeds=embeds[i:i + 1], use_cache=False, output_attentions=True,
                                         return_dict=True).last_hidden_state[0].numpy())
    m = margins.report(case)
    common.check_margin(case, m)
    keeps = np.stack(keeps)
    gap = np.abs(np.stack(hid_mask)[np.arange(3)[:, None], keeps] - np.stack(hid)).max()
    print(f"[{case}] inplace vs mask mode on kept slots: max |diff| = {gap:.3g}")
    hf_config = {k2: v for k2, v in json.loads(cfg.to_json_string()).items() if not k2.startswith("fast_v")}
    arrays = {f"param/{n}": v for n, v in sd.items() if not n.endswith("rotary_emb.inv_freq")}
    arrays.update(hf_config=np.array(json.dumps(hf_config)), embeds=embeds.numpy(), attn_row=np.stack(rows),
                  hidden_k=np.stack(hk), keep=keeps, hidden=np.stack(hid), hidden_mask_mode=np.stack(hid_mask),
                  min_margin=np.float64(m))
    common.save_golden(os.path.join(args.out, case + ".npz"), arrays,
                       {"repo": "pkunlp-icler/FastV", "commit": COMMIT, "transformers": transformers.__version__,
                        "torch": torch.__version__, "seed": SEED, "noise": NOISE, "sys": SYS, "image": IMG,
                        "text": TXT, "agg_layer": k, "rank": rank})


if __name__ == "__main__":
  main()
