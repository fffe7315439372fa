"""Golden fixture for PyramidDrop (tokcomp/vlm/pyramiddrop.py) inside tokcomp's Llama decoder.

Reference: Cooperx521/PyramidDrop, commit 6444f304aee4b7edcb022839fb9e8cd07859704a (MIT; run only, nothing copied).
What runs: `llava/model/modeling_llama_pdrop.py` (its own copy of transformers 4.37's Llama with `pdrop_forward` and
`pdrop_rank_drop`) under transformers 4.37.2 (the version its pyproject pins), float32, CPU, no_grad:
`LlamaForCausalLM(cfg).model.pdrop_forward(inputs_embeds=..., use_cache=False, output_hidden_states=True)` with the
inference attributes LLaVA's `prepare_inputs_labels_for_multimodal_pdrop` sets (`image_token_posi`, `prompt_len`,
`image_tokens`) and the eval script's `layer_list` / `image_token_ratio_list` (with 1.0 inserted at the front, as
`model_vqa_loader.py` does). SDPA attention (`_attn_implementation="sdpa"`, no attention mask: LLaVA's batch-1
inference path; the eager path cannot run after a drop without a mask).

Adaptations at run time (the reference files are not edited):
  * `pdrop_rank_drop` is wrapped: the softmax it computes is recorded (a temporary wrapper of
    torch.nn.functional.softmax during the call), and the kept rows are recovered by matching the returned hidden
    states against its input rows (exact copies).
  * "original" runs: the wrapper replaces the returned position ids (renumbered 0..S'-1 by the reference) by the
    kept tokens' ORIGINAL positions, tokcomp's contract; `LlamaRotaryEmbedding.forward` then returns its whole cached
    table (the reference slices it to the current length; the values are unchanged) so those positions index it.
  * "renumbered" runs: the reference as it is; only its kept sets are stored (stage 1 must equal ours; later
    stages may differ through the positions).

Model: hidden 64, 4 heads, 4 kv heads (multi-head: `pdrop_rank_drop` has no repeat_kv; LLaVA-1.5's Vicuna is MHA),
4 layers, MLP 128, vocab 128, eps 1e-6, theta 10000, untied head, `initializer_range=0.1` + N(0, 0.05) noise
(seeded). Sequence: 5 system + 49 image + 7 text = 61 N(0, 1) embeddings, 3 samples, each run alone (batch 1).
Cases, one file tests/goldens/pyramiddrop_tiny.npz (shared params/embeds):
  r05   layer_list [1, 2, 3], ratios [0.5, 0.25, 0.125] -> 24, 12, 6 image tokens ("layers=1-2-3,ratio=0.5")
  list  layer_list [1, 3],    ratios [0.7, 0.3]         -> 34, 14      ("layers=1-3,ratios=0.7-0.3")
Saved per case <c>/: rows_<stage> [3, H, S_stage] (the ranking softmax row of the last query, per head),
hidden_in_<stage> [3, S_stage, 64] (hidden states entering the stage's layer), keep_<stage> [3, S'] (kept ORIGINAL
slots after the stage), hidden [3, S_final, 64] (final-normed), renumbered_keep_<stage> [3, S'] (unadapted run);
plus param/*, hf_config, embeds, min_margin (smallest relative top-k gap at any cut), config (JSON).

Command (repo root):
  /work/venv-torch/bin/pip install --no-deps --target /work/refs/pydeps-hf437 transformers==4.37.2 \
      tokenizers==0.15.2 huggingface_hub==0.20.3 regex requests urllib3 certifi charset_normalizer idna pyyaml \
      packaging filelock tqdm fsspec typing_extensions
  PYTHONPATH=/work/refs/pydeps-hf437 /work/venv-torch/bin/python tools/goldens/make_pyramiddrop.py \
      --repo /work/refs/PyramidDrop --out tests/goldens
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

COMMIT = "6444f304aee4b7edcb022839fb9e8cd07859704a"
SEED = 0
NOISE = 0.05
SYS, IMG, TXT = 5, 49, 7
CASES = {"r05": ([1, 2, 3], [0.5, 0.25, 0.125]), "list": ([1, 3], [0.7, 0.3])}


def build(M):
  import transformers
  cfg = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
      num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256, initializer_range=0.1,
      tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
  cfg._attn_implementation = "sdpa"
  common.set_deterministic(SEED)
  model = M.LlamaForCausalLM(cfg).eval()
  common.perturb_parameters(model, NOISE, SEED + 1)
  return model, cfg


class Recorder:
  """Wraps LlamaModel.pdrop_rank_drop (see the module docstring)."""

  def __init__(self, M, torch, original_positions):
    self.M, self.torch, self.original = M, torch, original_positions
    self.rows, self.hidden_in, self.keep = [], [], []
    self.origin = np.arange(SYS + IMG + TXT)
    self.orig_drop = M.LlamaModel.pdrop_rank_drop

  def __enter__(self):
    torch, rec = self.torch, self

    def drop(model, cur_num, rank_layer, features, position_ids, attention_mask, labels):
      seen = []
      softmax = torch.nn.functional.softmax

      def spy(*a, **k):
        out = softmax(*a, **k)
        seen.append(out.detach().clone())
        return out

      torch.nn.functional.softmax = spy
      try:
        pos, mask, new, lab = rec.orig_drop(model, cur_num, rank_layer, features, position_ids, attention_mask, labels)
      finally:
        torch.nn.functional.softmax = softmax
      assert len(seen) == 1 and features.shape[0] == 1
      rec.rows.append(seen[0][:, 0].numpy())  # [H, S]
      rec.hidden_in.append(features[0].numpy().copy())
      rows = features[0]
      kept = [int(torch.nonzero((rows == r).all(-1))[0, 0]) for r in new[0]]
      assert kept == sorted(kept) and len(set(kept)) == len(kept)
      rec.origin = rec.origin[kept]  # original slots of the kept rows
      rec.keep.append(rec.origin.copy())
      if rec.original:
        pos = position_ids[:, kept]
      return pos, mask, new, lab

    self.M.LlamaModel.pdrop_rank_drop = drop
    if self.original:
      rope = self.M.LlamaRotaryEmbedding
      self.orig_rope = rope.forward
      rope.forward = lambda emb, x, seq_len=None: (emb.cos_cached.to(dtype=x.dtype), emb.sin_cached.to(dtype=x.dtype))
    return self

  def __exit__(self, *exc):
    self.M.LlamaModel.pdrop_rank_drop = self.orig_drop
    if self.original:
      self.M.LlamaRotaryEmbedding.forward = self.orig_rope


def run(M, torch, model, embeds, layers, ratios, original):
  inner = model.model
  inner.layer_list, inner.image_token_ratio_list = list(layers), [1.0] + list(ratios)
  inner.image_token_posi, inner.prompt_len, inner.image_tokens = [SYS], [SYS + TXT], [IMG]
  with Recorder(M, torch, original) as rec:
    out, _ = inner.pdrop_forward(inputs_embeds=embeds, use_cache=False, output_attentions=False,
                                 output_hidden_states=True, return_dict=True)
  return rec, out.last_hidden_state[0].numpy()


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--repo", default="/work/refs/PyramidDrop")
  ap.add_argument("--out", default="tests/goldens")
  args = ap.parse_args()
  common.register_torchvision_nms_stub()
  sys.path.insert(0, os.path.abspath(args.repo))
  import torch
  import transformers
  assert transformers.__version__ == "4.37.2", transformers.__version__
  import llava.model.modeling_llama_pdrop as M

  model, cfg = build(M)
  sd = {n: v.detach().numpy().copy() for n, v in model.state_dict().items()}
  gen = torch.Generator().manual_seed(SEED + 2)
  embeds = torch.randn(3, SYS + IMG + TXT, 64, generator=gen)
  arrays = {f"param/{n}": v for n, v in sd.items() if not n.endswith("rotary_emb.inv_freq")}
  hf_config = {k: v for k, v in json.loads(cfg.to_json_string()).items() if k != "_attn_implementation"}
  arrays.update(hf_config=np.array(json.dumps(hf_config)), embeds=embeds.numpy())
  margins = common.MarginLog()
  with torch.no_grad():
    for case, (layers, ratios) in CASES.items():
      per = {}
      for i in range(3):
        rec, hidden = run(M, torch, model, embeds[i:i + 1], layers, ratios, original=True)
        ren, _ = run(M, torch, model, embeds[i:i + 1], layers, ratios, original=False)
        counts = [IMG] + [int(IMG * r) for r in ratios]
        for st in range(len(layers)):
          score = rec.rows[st].mean(0)[SYS:SYS + counts[st]]
          margins.add(f"{case}/sample{i}/stage{st}", common.topk_cut_gap(np.sort(score)[::-1], counts[st + 1]))
          for key, val in ((f"rows_{st}", rec.rows[st]), (f"hidden_in_{st}", rec.hidden_in[st]),
                           (f"keep_{st}", rec.keep[st]), (f"renumbered_keep_{st}", ren.keep[st])):
            per.setdefault(key, []).append(val)
        per.setdefault("hidden", []).append(hidden)
        same = [np.array_equal(a, b) for a, b in zip(rec.keep, ren.keep)]
        print(f"[{case}] sample {i}: kept {[len(k) for k in rec.keep]}; renumbered run chooses the same: {same}")
      arrays.update({f"{case}/{k}": np.stack(v) for k, v in per.items()})
  m = margins.report("pyramiddrop")
  common.check_margin("pyramiddrop", m)
  arrays["min_margin"] = np.float64(m)
  common.save_golden(os.path.join(args.out, "pyramiddrop_tiny.npz"), arrays,
                     {"repo": "Cooperx521/PyramidDrop", "commit": COMMIT, "transformers": transformers.__version__,
                      "torch": torch.__version__, "seed": SEED, "noise": NOISE, "sys": SYS, "image": IMG, "text": TXT,
                      "cases": {c: {"layers": l, "ratios": r} for c, (l, r) in CASES.items()}})


if __name__ == "__main__":
  main()
