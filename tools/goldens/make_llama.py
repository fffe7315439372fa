"""Golden fixture for tokcomp's Llama decoder and its HF loader (tokcomp/models/llm.py, checkpoints/hf_llama.py).

Reference: HF transformers 4.46.3 `LlamaForCausalLM` (Apache-2.0; run only), eager attention, float32, CPU.
A tiny random model (hidden 64, 4 heads, 2 kv heads, 3 layers, MLP 128, vocab 128, rope theta 10000, RMSNorm eps
1e-6, untied head) is built with `initializer_range=0.1` (0.02 leaves the logits nearly flat), every parameter then
gets N(0, 0.05) noise with a fixed seed (so the RMSNorm weights are not all ones), `save_pretrained` writes
model.safetensors + config.json to a temp dir, and the fixture stores exactly what the loader reads from there:
  param/<key>          the arrays of model.safetensors (safetensors.numpy.load_file)
  hf_config            config.json's text (0-d str)
  ids [2, 12]          input ids; positions [2, 12] non-contiguous, increasing (row 0: gaps as after a prune,
                       row 1: starts at 3); logits [2, 12, 128] for (ids, positions), no padding
  gen_ids [2, 7]       prompts for greedy decoding (contiguous positions 0..6); gen_tokens [2, 6] from
                       `generate(max_new_tokens=6, do_sample=False)`, gen_logits [2, 6, 128] (scores per step),
                       min_margin = the smallest relative top-1/top-2 gap over the generated steps
Transformers runs from a --target dir of the torch venv (no torch in it):
  /work/venv-torch/bin/pip install --no-deps --target /work/refs/pydeps-hf4 "transformers>=4.46,<4.47" \
      "huggingface_hub>=0.26,<1.0" "tokenizers>=0.20,<0.21" regex requests urllib3 certifi charset_normalizer
Command (repo root):
  PYTHONPATH=/work/refs/pydeps-hf4 /work/venv-torch/bin/python tools/goldens/make_llama.py --out tests/goldens
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

SEED = 0
NOISE = 0.05


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="tests/goldens")
  args = ap.parse_args()
  common.register_torchvision_nms_stub()  # transformers imports torchvision when it is installed
  import torch
  import transformers
  from safetensors.numpy import load_file

  common.set_deterministic(SEED)
  cfg = transformers.LlamaConfig(
      vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
      num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=256,
      initializer_range=0.1, tie_word_embeddings=False, attn_implementation="eager",
      bos_token_id=1, eos_token_id=2, pad_token_id=0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  common.perturb_parameters(model, NOISE, SEED + 1)

  gen = torch.Generator().manual_seed(SEED + 2)
  ids = torch.randint(3, 128, (2, 12), generator=gen)
  positions = torch.tensor([[0, 1, 2, 3, 9, 10, 14, 15, 16, 17, 18, 19],
                            [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
  gen_ids = torch.randint(3, 128, (2, 7), generator=gen)
  with torch.no_grad():
    logits = model(input_ids=ids, position_ids=positions, use_cache=False).logits
    out = model.generate(gen_ids, attention_mask=torch.ones_like(gen_ids), max_new_tokens=6, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0)
  gen_tokens = out.sequences[:, gen_ids.shape[1]:]
  gen_logits = torch.stack(out.scores, dim=1)
  top2 = torch.topk(gen_logits, 2, dim=-1).values
  margins = common.MarginLog()
  for b in range(2):
    for t in range(gen_logits.shape[1]):
      margins.add(f"b{b} step{t}", common.relative_gap(float(top2[b, t, 0]), float(top2[b, t, 1])))
  m = margins.report("llama greedy")
  common.check_margin("llama greedy", m)

  with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp, safe_serialization=True)
    state = load_file(os.path.join(tmp, "model.safetensors"))
    with open(os.path.join(tmp, "config.json")) as f:
      hf_config = f.read()
  arrays = {f"param/{k}": v for k, v in state.items()}
  arrays.update(ids=ids.numpy(), positions=positions.numpy(), logits=logits.numpy(), gen_ids=gen_ids.numpy(),
                gen_tokens=gen_tokens.numpy(), gen_logits=gen_logits.numpy(), min_margin=np.float64(m),
                hf_config=np.array(hf_config))
  common.save_golden(os.path.join(args.out, "llama_tiny.npz"), arrays,
                     {"transformers_version": transformers.__version__, "torch_version": torch.__version__,
                      "seed": SEED, "noise": NOISE})


if __name__ == "__main__":
  main()
