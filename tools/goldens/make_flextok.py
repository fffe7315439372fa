"""Golden fixtures for FlexTok's building blocks from the official PyTorch reference.

Reference: apple/ml-flextok, commit 87d00cc8babf4a25ffce0f3f0c4d8b529d3d6abf (Apple sample-code licence;
read/run only, nothing of it is copied into tokcomp). Only the python sources are needed; the released model
configs (inside the HF checkpoints) are not. What runs, all on CPU, float32, torch.no_grad:

  fsq/*        ``flextok.regularizers.quantize_fsq.FSQ(levels).eval().forward_z(z)`` and
               ``indices_to_embedding(ids)`` for levels [8,8,8,5,5,5] (FlexTok's) and [7,5,4,3]
               (odd and even levels mixed).
  mask/*       the encoder's register attention mask: ``BlockWiseSequencePacker`` with
               ``mask_mode="causal_last"`` over the lists [patches, registers] (the prefix-LM packing),
               ``max_seq_len=128``, ``return_materialized_mask=True`` (flex_attention's ``create_mask``);
               the top-left [N+K, N+K] block of the materialised mask, for (N, K) = (16, 8) and (9, 5).
  dropout/*    ``MaskedNestedDropout`` in eval mode with ``eval_keep_k`` = (1, 3, K): the registers after
               replacement; and the keep-k mapping of ``sample_keep_k`` for every draw k in 1..K under
               "uniform_pow2" (``np.random.randint`` inside that module replaced by a function returning
               k), plus the "pow2" support (``powers_of_two(1, K)``), for K = 8 and K = 6 (uniform_pow2 only).
  temb/*       ``TimestepEmbedder(max_timestep=1.0).timestep_embedding(t, 256)`` (the sinusoid only).
  noise/*      ``MinRFNoiseModule(ln=True)`` with the noise given (``noise_read_key``): the sigmas it draws
               under torch.manual_seed(0) and the noised images.
  euler/*      ``MinRFPipeline`` (timesteps=5, guidance 1) around a stub model whose "prediction" is
               v(x, t) = 0.5 x + t (a fixed, non-trivial velocity field), with the starting noise given.

Adaptations, by sys.modules stubs at run time only: ``mup`` (imported by the reference, used only by its μP
init and readout), ``hydra`` (used only to instantiate released configs) and ``requests`` (demo image download)
are empty modules; torchvision's nms schema is declared (common.register_torchvision_nms_stub). flex_attention's ``create_mask`` runs on CPU unchanged.

Saved (tests/goldens/flextok_reference.npz): the arrays named above, the inputs, and ``min_margin``: the
smallest distance of FSQ's bounded values from a rounding boundary (x.5), relative to 1 (it must be > 1e-4 so
that a 1-ulp difference cannot change a code), and config (JSON).

Command (from the repo root, using the separate torch venv):
  /work/venv-torch/bin/python tools/goldens/make_flextok.py --flextok-repo /work/refs/flextok --out tests/goldens
"""

from __future__ import annotations

import argparse
import os
import sys
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

COMMIT = "87d00cc8babf4a25ffce0f3f0c4d8b529d3d6abf"


def stub_missing_imports():
  """Empty stand-ins for packages the reference imports but the code run here never uses: ``mup`` (its μP
  init and readout layer), ``hydra`` (``utils/checkpoint.py``'s config instantiation) and ``requests``
  (``utils/demo.py``'s image download)."""
  mup = types.ModuleType("mup")
  mup.init = types.SimpleNamespace()
  mup_layer = types.ModuleType("mup.layer")
  mup_layer.MuReadout = object
  mup.layer = mup_layer
  hydra = types.ModuleType("hydra")
  hydra_utils = types.ModuleType("hydra.utils")
  hydra_utils.instantiate = None
  hydra.utils = hydra_utils
  requests = types.ModuleType("requests")  # utils/demo.py's image download
  for name, module in (("mup", mup), ("mup.layer", mup_layer), ("hydra", hydra), ("hydra.utils", hydra_utils),
                       ("requests", requests)):
    sys.modules.setdefault(name, module)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--flextok-repo", default="/work/refs/flextok")
  ap.add_argument("--out", default="tests/goldens")
  args = ap.parse_args()
  common.add_repo_to_path(args.flextok_repo)
  stub_missing_imports()
  common.register_torchvision_nms_stub()  # utils/demo.py imports torchvision
  import torch
  from flextok.flow_matching.noise_modules import MinRFNoiseModule
  from flextok.flow_matching.pipelines import MinRFPipeline
  from flextok.model.preprocessors import token_dropout
  from flextok.model.preprocessors.flex_seq_packing import BlockWiseSequencePacker
  from flextok.model.preprocessors.registers import powers_of_two
  from flextok.model.preprocessors.time_embedding import TimestepEmbedder
  from flextok.regularizers.quantize_fsq import FSQ

  common.set_deterministic(0)
  out = {}
  margins = common.MarginLog()

  # FSQ.
  for name, levels in (("flextok", [8, 8, 8, 5, 5, 5]), ("mixed", [7, 5, 4, 3])):
    gen = torch.Generator().manual_seed(1)
    z = torch.randn(3, 8, len(levels), generator=gen) * 2.0
    fsq = FSQ("z", "q", "ids", levels).eval()
    with torch.no_grad():
      quant, ids = fsq.forward_z(z)
      bounded = fsq.bound(z)
      codes = fsq.indices_to_embedding(ids)
    frac = (bounded - bounded.floor()).numpy()
    for v in np.abs(frac - 0.5).ravel():
      margins.add(f"fsq_{name}", float(v))
    out[f"fsq/{name}/levels"] = np.asarray(levels)
    out[f"fsq/{name}/z"] = z.numpy()
    out[f"fsq/{name}/bounded"] = bounded.numpy()
    out[f"fsq/{name}/quant"] = quant.numpy()
    out[f"fsq/{name}/ids"] = ids.numpy()
    out[f"fsq/{name}/codes"] = codes.numpy()

  # The encoder's register attention mask (prefix LM over [patches | registers]).
  for n, k in ((16, 8), (9, 5)):
    packer = BlockWiseSequencePacker(["patches", "registers"], "seq", "mask", "inner", "outer",
                                     mask_mode="causal_last", max_seq_len=128, return_materialized_mask=True)
    dd = packer({"patches": [torch.zeros(1, n, 4)], "registers": [torch.zeros(1, k, 4)]})
    mask = dd["mask"].reshape(128, 128)[: n + k, : n + k].numpy().astype(bool)
    out[f"mask/n{n}_k{k}"] = mask

  # Nested dropout: replacement at eval keep k, the uniform_pow2 mapping and the pow2 support.
  k_max, dim = 8, 5
  drop = token_dropout.MaskedNestedDropout("registers", dim).eval()
  gen = torch.Generator().manual_seed(2)
  regs = [torch.randn(1, k_max, dim, generator=gen) for _ in range(3)]
  out["dropout/registers"] = torch.cat(regs).numpy()
  out["dropout/mask_token"] = drop.dropout_mask_token.detach().numpy()
  keep = [1, 3, k_max]
  with torch.no_grad():
    dd = drop({"registers": [r.clone() for r in regs], "eval_keep_k": keep})
  out["dropout/keep_k"] = np.asarray(keep)
  out["dropout/out"] = torch.cat(dd["registers"]).numpy()
  for kk in (8, 6):
    mapped = []
    for draw in range(1, kk + 1):
      real_np = token_dropout.np
      token_dropout.np = types.SimpleNamespace(random=types.SimpleNamespace(randint=lambda low, high, d=draw: d))
      try:
        mapped.append(int(token_dropout.MaskedNestedDropout("r", 1, size_sampling_mode="uniform_pow2")
                          .sample_keep_k(kk)))
      finally:
        token_dropout.np = real_np
    out[f"dropout/uniform_pow2_k{kk}"] = np.asarray(mapped)
  out["dropout/pow2_k8"] = np.asarray(powers_of_two(1, 8))

  # The time embedding's sinusoid.
  temb = TimestepEmbedder("t", "e", dim=32, max_timestep=1.0)
  t = torch.tensor([0.0, 0.013, 0.25, 0.5, 0.77, 1.0])
  out["temb/t"] = t.numpy()
  out["temb/emb"] = temb.timestep_embedding(t, 256).numpy()

  # Rectified-flow noising (sigmas drawn by the reference with the noise given).
  gen = torch.Generator().manual_seed(3)
  clean = [torch.randn(1, 3, 4, 4, generator=gen) for _ in range(4)]
  noise = [torch.randn(1, 3, 4, 4, generator=gen) for _ in range(4)]
  torch.manual_seed(0)
  nm = MinRFNoiseModule("clean", "noised", "t", "sigma", ln=True, noise_read_key="noise")
  dd = nm({"clean": clean, "noise": noise})
  out["noise/clean"] = torch.cat(clean).numpy()
  out["noise/noise"] = torch.cat(noise).numpy()
  out["noise/sigmas"] = dd["sigma"].numpy()
  out["noise/timesteps"] = dd["t"].numpy()
  out["noise/noised"] = torch.cat(dd["noised"]).numpy()

  # The Euler sampler around a stub velocity v(x, t) = 0.5 x + t.
  class Stub(torch.nn.Module):
    device = torch.device("cpu")

    def forward(self, d):
      d["v"] = [0.5 * x + t for x, t in zip(d["x_t"], d["t"])]
      return d

  steps = 5
  gen = torch.Generator().manual_seed(4)
  x1 = [torch.randn(1, 3, 4, 4, generator=gen) for _ in range(2)]
  pipe = MinRFPipeline(Stub(), noise_read_key="x1", latents_read_key="x1", timesteps_read_key="t",
                       noised_images_read_key="x_t", reconst_write_key="v", out_channels=3)
  dd = pipe({"x1": [x.clone() for x in x1]}, timesteps=steps, vae_image_sizes=4, verbose=False)
  out["euler/steps"] = np.asarray(steps)
  out["euler/x1"] = torch.cat(x1).numpy()
  out["euler/x0"] = torch.cat(dd["v"]).numpy()

  margin = margins.report("flextok")
  common.check_margin("flextok", margin)
  out["min_margin"] = np.float64(margin)
  cfg = {"reference": "apple/ml-flextok", "commit": COMMIT, "seeds": [0, 1, 2, 3, 4],
         "euler_stub_velocity": "0.5 * x + t", "torch_version": torch.__version__}
  common.save_golden(os.path.join(args.out, "flextok_reference.npz"), out, cfg)


if __name__ == "__main__":
  main()
