r"""Fine-tune a learned token reducer into the trained Fashion-MNIST ViT (configs/fmnist_vit.py), at about half of
the dense FLOPs.

Runs: train.py from `init_from` (the dense run's workdir; the reducer's own parameters start fresh), with the
method's losses (e.g. DynamicViT's ratio loss, sown by its module) and, where the method trains that way,
distillation from the frozen dense model (KL on the logits, MSE on the kept tokens).

  python train.py --config configs/fmnist_learned.py:method=dynamicvit --workdir workdirs/fm_dynamicvit
  python train.py --config configs/fmnist_learned.py:method=dynamicvit,source=npz:../shared/data/fashion_mnist.npz,init_from=benchmarks/fmnist_vit --workdir W
  python train.py --config configs/fmnist_learned.py:method=dynamicvit,runlocal --workdir /tmp/smoke  # seconds
  python eval.py --mode=eval --config configs/fmnist_learned.py:method=dynamicvit --workdir workdirs/fm_dynamicvit

Args after the colon: method (one of METHODS), plus every fmnist_vit argument (source, steps (1000), batch, lr
(2e-4), seed, dtype, init_from (benchmarks/fmnist_vit), runlocal).
Expect (300 steps of 128 from benchmarks/fmnist_vit, CPU AMD EPYC 2 cores, JAX 0.10.2, 2026-12-07; the table with
img/s is benchmarks/fmnist_learned/sweep.md), test accuracy at ~0.13-0.15 GFLOPs (50-55 % of dense): tome 85.78 %,
patchmerger 84.94 %, tokenfuser 84.62 %, tokenlearner 84.47 %, tokenlearner_v1 84.12 %, evit 83.75 %, stvit 83.09 %,
dynamicvit 81.33 %, sit_frd 81.04 %, sit 80.70 %; the dense control (same 300 steps, no reducer) 85.82 %;
diffrate_search's schedule (197-94-72-72-72-71), run training-free on that control, 82.10 %.
"""
from configs import fmnist_vit
from configs.common import parse_arg

# method -> the reducer spec at ~50 % of the dense FLOPs (depth 6, 197 tokens), the spec for the 2-block
# runlocal model, and the distillation weights (None: plain cross-entropy fine-tuning). Training-free methods
# trained in (the item 7) are here too: ToMe at a fixed r, EViT with its keep rate cosine-annealed
# from 1 (`anneal`: start and length as fractions of the run, as the reference's shrink_start_epoch /
# shrink_epochs; `schedules.cosine_anneal`, one compile per stage).
METHODS = {
    "tome": dict(reduce="tome:r=30", runlocal="tome:r=4", distill=dict(logits=0.5, tokens=0.0)),  # 51 % FLOPs
    # keep 0.55 at blocks 1, 3, 4: 51 % FLOPs at the end of the anneal.
    "evit": dict(reduce="evit:keep={keep},layers=1-3-4", runlocal="evit:keep={keep},layers=1", base=0.55,
                 anneal=dict(start=0.1, steps=0.5, stages=6), distill=dict(logits=0.5, tokens=0.0)),
    # DiffRate's search: only the rate logits train (the ViT is frozen), AdamW at the reference's arch-lr 0.01,
    # no weight decay, the FLOPs loss on the ratio to dense; writes workdir/compression_rate.json, which
    # `diffrate:schedule=` then runs training-free.
    "diffrate_search": dict(reduce="diffrate_search", runlocal="diffrate_search", distill=None,
                            overrides=dict(train_only="diffrate_search", lr=0.01, weight_decay=0.0,
                                           flops_target=dict(ratio=0.5, weight=5.0 * 4.6 ** 2))),
    # ρ = 0.62 at blocks 1, 3, 4 (the paper's 3-6-9 of 12, scaled): 196 -> 121 -> 75 -> 46 patches, 50 % FLOPs
    # with the three predictors (5 % of them).
    "dynamicvit": dict(reduce="dynamicvit:keep=0.62", runlocal="dynamicvit:keep=0.7,layers=1",
                       distill=dict(logits=0.5, tokens=0.5)),
    # M = 8 merged tokens (the paper's default) before block 3 of 6 (halfway): 196 -> 8 patches, 52 % FLOPs.
    "patchmerger": dict(reduce="patchmerger:tokens=8,layer=3", runlocal="patchmerger:tokens=8,layer=1",
                        distill=dict(logits=0.5, tokens=0.0)),
    # TSM with ρ = 0.5 before blocks 2, 3, 4: 196 -> 98 -> 49 -> 24 tokens, 50 % FLOPs with the TSMs (logits
    # distillation only; "sit_frd" adds SiT's FRD token distillation).
    "sit": dict(reduce="sit:keep=0.5,layers=2-3-4", runlocal="sit:keep=0.5,layers=1",
                distill=dict(logits=0.5, tokens=0.0)),
    # The same TSMs with SiT's full recipe: FRD (every block's tokens mapped back to all patches by the reverse
    # TSM, MSE to the dense teacher's, lambda_token 2) and the logits distillation at SiT's weight 2. Evaluate
    # with the same spec (frd=1 adds the reverse TSMs' parameters; they are idle at inference).
    "sit_frd": dict(reduce="sit:keep=0.5,layers=2-3-4,frd=1", runlocal="sit:keep=0.5,layers=1,frd=1",
                    distill=dict(logits=2.0, tokens=0.0, frd=2.0)),
    # M = 25 semantic tokens (5 x 5 max-pool init) before block 2 of 6, the generation layers at the ViT's heads
    # and MLP ratio: 196 -> 25 patches, 49.5 % FLOPs (40 % for the blocks, 9.5 % for the two generation layers,
    # which ViT.flops counts). Logits distillation only (the sequence is short in training).
    "stvit": dict(reduce="stvit:tokens=25,layer=2,heads=3,mlp_ratio=2",
                  runlocal="stvit:tokens=16,layer=1,heads=2,mlp_ratio=2", distill=dict(logits=0.5, tokens=0.0)),
    # S = 8 learned tokens (scenic's EncoderMod default) before block 3 of 6 (halfway): 196 -> 8 patches, 53 %
    # FLOPs with its scoring MLP (logits distillation only: the sequence is short in training too).
    # TokenLearner + TokenFuser in every block from 3 on (8 tokens inside each block, 196 again after it),
    # bottleneck 32: 55 % FLOPs with the learners and fusers.
    "tokenfuser": dict(reduce="tokenfuser:tokens=8,layer=3,bottleneck=32",
                       runlocal="tokenfuser:tokens=8,layer=1,bottleneck=16", distill=dict(logits=0.5, tokens=0.5)),
    "tokenlearner": dict(reduce="tokenlearner:tokens=8,layer=3", runlocal="tokenlearner:tokens=8,layer=1",
                         distill=dict(logits=0.5, tokens=0.0)),
    # TokenLearner v1 (Ryoo et al. 2021 §2, the spatial-attention version): the same 8 tokens, weights from a
    # stack of convolutions with a sigmoid instead of the v1.1 MLP with a softmax.
    "tokenlearner_v1": dict(reduce="tokenlearner:tokens=8,layer=3,version=1",
                            runlocal="tokenlearner:tokens=8,layer=1,version=1", distill=dict(logits=0.5, tokens=0.0)),
}


def get_config(arg: str | None = None):
  a = parse_arg(arg, method="dynamicvit", source="embedded:fashion_mnist", steps=1000, batch=128, lr=2e-4, seed=0,
                dtype="float32", init_from="benchmarks/fmnist_vit", runlocal=False)
  if a.method not in METHODS:
    raise ValueError(f"configs/fmnist_learned.py method={a.method!r}: must be one of {sorted(METHODS)}")
  m = METHODS[a.method]
  c = fmnist_vit.get_config(f"source={a.source},steps={a.steps},batch={a.batch},lr={a.lr},seed={a.seed},"
                            f"dtype={a.dtype},init_from={a.init_from}" + (",runlocal" if a.runlocal else ""))
  c.method = a.method
  c.reduce = m["runlocal"] if a.runlocal else m["reduce"]
  if "anneal" in m:
    steps = c.steps
    c.reduce_anneal = dict(spec=c.reduce, base=m["base"], start=int(m["anneal"]["start"] * steps),
                           steps=max(1, int(m["anneal"]["steps"] * steps)),
                           stages=min(m["anneal"]["stages"], max(1, steps - 1)))
    c.reduce = c.reduce.format(keep=m["base"])  # what the run ends with, and what eval.py measures
  c.warmup_steps = max(1, min(100, c.steps // 10))
  c.update(m.get("overrides", {}))
  if m["distill"]:
    c.distill = dict(teacher="init", **m["distill"])
  c.sweep = ""  # the training-free sweep belongs to the dense model; eval.py --mode=eval measures this one
  return c
