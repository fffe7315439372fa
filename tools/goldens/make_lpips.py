"""Golden fixture for LPIPS-VGG (tokcomp/tokenizers/lpips.py) from the `lpips` PyPI package.

  /work/venv-torch/bin/pip install lpips==0.1.4
  /work/venv-torch/bin/python tools/goldens/make_lpips.py --out tests/goldens

Reference: `lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True)` (lpips 0.1.4, BSD-2-Clause,
github.com/richzhang/PerceptualSimilarity): `pnet_rand=True` builds torchvision's vgg16 without downloading
ImageNet weights; `pretrained=True` loads the package's own lin weights (`lpips/weights/v0.1/vgg.pth`, shipped in
the wheel). The VGG16 weights are then overwritten with a seeded NumPy recipe (`random_vgg16` below; the test
regenerates the same arrays, so the 58 MB trunk is never committed): He-normal convs, N(0, 0.05²) biases, drawn
with `np.random.default_rng(seed)` in conv order. The fixture holds per-conv checksums of those arrays so the
test proves it regenerated the same weights.

Cases (images uint8, used as float32(u8) / 255 on both sides, so the inputs are bit-identical): NHWC [B, H, W, C]
  rgb64       B=3, 64x64x3: y = x + small noise, x + large noise, an unrelated image
  rgb32       B=1, 32x32x3 (the smallest size tokcomp accepts)
  rgb48x72    B=2, 48x72x3 (non-square)
  gray40x56   B=2, 40x56x1 (the reference is fed the image repeated to 3 channels, as tokcomp does)
Each is run through `model(x, y, normalize=True, retPerLayer=True)` ([0, 1] inputs, the package's own [0, 1] ->
[-1, 1] path). Adaptations: none (the CPU torchvision wheel's nms stub, `common.register_torchvision_nms_stub`,
is declared only because torchvision is imported).

Arrays: config (JSON), lin/lin{l}.model.1.weight (the package's real lin weights, [1, C, 1, 1]),
<case>/x, <case>/y (uint8 NHWC), <case>/d [B], <case>/per_layer [5, B], check/<N>.{weight,bias} ([sum (f64),
first 3 values] of each regenerated array).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CONVS_PER_STAGE = (2, 2, 3, 3, 3)
WIDTHS = (64, 128, 256, 512, 512)
SEED = 0
CASES = {"rgb64": (3, 64, 64, 3), "rgb32": (1, 32, 32, 3), "rgb48x72": (2, 48, 72, 3), "gray40x56": (2, 40, 56, 1)}


def random_vgg16(seed: int, widths=WIDTHS) -> dict[str, np.ndarray]:
  """torchvision vgg16 `features.N.{weight,bias}` drawn from a seed (the test has the same recipe)."""
  rng = np.random.default_rng(seed)
  stages = [s for s, n in enumerate(CONVS_PER_STAGE) for _ in range(n)]
  out, cin = {}, 3
  for index, stage in zip(CONV_INDICES, stages):
    cout = widths[stage]
    out[f"features.{index}.weight"] = rng.standard_normal((cout, cin, 3, 3), dtype=np.float32) * np.float32(
        np.sqrt(2.0 / (9 * cin)))
    out[f"features.{index}.bias"] = rng.standard_normal((cout,), dtype=np.float32) * np.float32(0.05)
    cin = cout
  return out


def make_pair(rng, shape, kind: str):
  x = rng.integers(0, 256, shape, dtype=np.uint8)
  if kind == "other":
    return x, rng.integers(0, 256, shape, dtype=np.uint8)
  noise = rng.normal(0.0, {"small": 8.0, "large": 60.0}[kind], shape)
  return x, np.clip(np.round(x.astype(np.float64) + noise), 0, 255).astype(np.uint8)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--out", default="tests/goldens")
  args = parser.parse_args()
  common.register_torchvision_nms_stub()
  common.set_deterministic(SEED)
  import torch
  import lpips
  from importlib.metadata import version

  model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  package_lin = torch.load(os.path.join(os.path.dirname(lpips.__file__), "weights/v0.1/vgg.pth"), map_location="cpu")
  for l in range(5):
    assert torch.equal(getattr(model, f"lin{l}").model[1].weight, package_lin[f"lin{l}.model.1.weight"])

  vgg = random_vgg16(SEED)
  loaded = 0
  with torch.no_grad():
    for k in range(1, 6):
      for name, module in getattr(model.net, f"slice{k}").named_children():
        if isinstance(module, torch.nn.Conv2d):
          module.weight.copy_(torch.from_numpy(vgg[f"features.{name}.weight"]))
          module.bias.copy_(torch.from_numpy(vgg[f"features.{name}.bias"]))
          loaded += 1
  assert loaded == 13, loaded

  arrays = {f"lin/{k}": v.numpy().astype(np.float32) for k, v in package_lin.items()}
  for k, v in vgg.items():
    arrays[f"check/{k[len('features.'):]}"] = np.array([v.astype(np.float64).sum(), *v.ravel()[:3]], np.float64)
  rng = np.random.default_rng(SEED + 1)
  summary = {}
  for case, shape in CASES.items():
    kinds = ["small", "large", "other"][:shape[0]]
    pairs = [make_pair(rng, shape[1:], kind) for kind in kinds]
    x, y = np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])
    to_torch = lambda u8: torch.from_numpy(
        np.ascontiguousarray((u8.astype(np.float32) / np.float32(255)).transpose(0, 3, 1, 2))).repeat(
        1, 3 // u8.shape[-1], 1, 1)
    with torch.no_grad():
      d, per_layer = model(to_torch(x), to_torch(y), retPerLayer=True, normalize=True)
    arrays[f"{case}/x"], arrays[f"{case}/y"] = x, y
    arrays[f"{case}/d"] = d.numpy().reshape(-1).astype(np.float32)
    arrays[f"{case}/per_layer"] = np.stack([r.numpy().reshape(-1) for r in per_layer]).astype(np.float32)
    summary[case] = {"d": arrays[f"{case}/d"].tolist(), "per_layer_min": float(arrays[f"{case}/per_layer"].min())}
  config = {"reference": "lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True), forward(normalize=True)",
            "lpips_version": version("lpips"), "torch_version": torch.__version__,
            "torchvision_version": version("torchvision"), "seed": SEED, "image_seed": SEED + 1,
            "vgg_recipe": "np.random.default_rng(seed); per conv in order: standard_normal((O, I, 3, 3), float32) * "
                          "float32(sqrt(2 / (9 I))), then standard_normal((O,), float32) * float32(0.05)",
            "widths": list(WIDTHS), "cases": {k: list(v) for k, v in CASES.items()},
            "images": "uint8 NHWC; float32(u8) / float32(255) on both sides"}
  arrays["config"] = np.array(json.dumps(config))
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "lpips_vgg.npz")
  np.savez_compressed(path, **arrays)
  print(json.dumps(summary, indent=1))
  print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB)")


if __name__ == "__main__":
  main()
