"""Golden fixture for the CLIP vision tower (tokcomp/models/vlm.py) and its loader (tokcomp/checkpoints/hf_clip.py).

Runs OUTSIDE tokcomp's environment: torch 2.13 CPU (/work/venv-torch) with HF transformers 4.46.3 installed with
`pip install --target /work/refs/pydeps-hf4 "transformers>=4.46,<4.47"`:

  cd tools/goldens && PYTHONPATH=/work/refs/pydeps-hf4 /work/venv-torch/bin/python make_clip.py

Writes
  tests/goldens/clip_tiny/{model.safetensors, config.json}   `CLIPVisionModel.save_pretrained` in float16 (the
      weights are rounded to fp16 before the reference runs, so the fp32 reference sees exactly the stored values)
  tests/goldens/clip_tiny.npz   pixel_values [2, 3, 56, 56] (NCHW), hidden_states [L+1, 2, 50, 64] (HF's tuple:
      index 0 = embeddings after pre_layrnorm, i = output of layer i), attentions [L, 2, 4, 50, 50] (eager softmax),
      keys [L, 2, 50, 16] (k_proj output incl. bias, before query scaling, averaged over heads; VisionZip's metric),
      pooled [2, 64] (post_layernorm of the last layer's CLS).

Model: hidden 64, 4 heads, 3 layers, intermediate 128, image 56, patch 8 (7x7 = 49 patches + CLS), quick_gelu,
LayerNorm eps 1e-5. HF's init (seed 0) leaves LayerNorms at (1, 0) and biases at 0, so every parameter gets seeded
N(0, 0.05) noise (seed 1) to make scale/bias mix-ups visible. Inputs: N(0, 1) images, seed 2.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

common.register_torchvision_nms_stub()  # transformers imports torchvision's image utils

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import CLIPVisionConfig, CLIPVisionModel  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
OUT_DIR = os.path.join(ROOT, "tests", "goldens", "clip_tiny")
OUT_NPZ = os.path.join(ROOT, "tests", "goldens", "clip_tiny.npz")


def main() -> None:
  common.set_deterministic(0)
  config = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            image_size=56, patch_size=8, num_channels=3, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5, attn_implementation="eager")
  model = CLIPVisionModel(config).eval()
  common.perturb_parameters(model, std=0.05, seed=1)
  with torch.no_grad():  # store fp16; run the reference on the same (fp16-exact) values in fp32
    for p in model.parameters():
      p.copy_(p.half().float())
  model.half().save_pretrained(OUT_DIR, safe_serialization=True)
  model.float()

  pixel_values = common.make_inputs(2, 56, seed=2)
  heads, hd = config.num_attention_heads, config.hidden_size // config.num_attention_heads
  keys = []
  hooks = [layer.self_attn.k_proj.register_forward_hook(
      lambda mod, inp, out: keys.append(out.reshape(out.shape[0], out.shape[1], heads, hd).mean(2)))
      for layer in model.vision_model.encoder.layers]
  with torch.no_grad():
    out = model(pixel_values=pixel_values, output_hidden_states=True, output_attentions=True)
  for h in hooks:
    h.remove()

  arrays = {
      "pixel_values": pixel_values.numpy(),
      "hidden_states": torch.stack(out.hidden_states).numpy(),
      "attentions": torch.stack(out.attentions).numpy(),
      "keys": torch.stack(keys).numpy(),
      "pooled": out.pooler_output.numpy(),
  }
  for k, v in arrays.items():
    print(k, v.shape, float(np.abs(v).max()))
  cls_rows = arrays["attentions"][:, :, :, 0]
  print("CLS-row attention range per layer:", [(float(r.min()), float(r.max())) for r in cls_rows])
  cfg = {"model": json.loads(config.to_json_string()), "perturb_std": 0.05, "seeds": {"init": 0, "perturb": 1,
         "inputs": 2}, "transformers_version": transformers.__version__, **common.versions()}
  common.save_golden(OUT_NPZ, arrays, cfg)
  print("checkpoint:", {f: os.path.getsize(os.path.join(OUT_DIR, f)) for f in sorted(os.listdir(OUT_DIR))})


if __name__ == "__main__":
  main()
