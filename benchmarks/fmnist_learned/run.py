r"""The learned-reducer table (issue 5): fine-tune every learned reducer of configs/fmnist_learned.py, LookupViT
(configs/fmnist_lookupvit.py) and a dense control from the trained ViT in benchmarks/fmnist_vit, each for the
same number of steps, then measure them all in one eval.py sweep beside the training-free reducers on the
dense control.

  python benchmarks/fmnist_learned/run.py --root workdirs/learned [--steps 300] [--only tome,evit]   # trains
  python benchmarks/fmnist_learned/run.py --root workdirs/learned --sweep_only --out benchmarks/fmnist_learned

Training runs are train.py subprocesses, one after another (each auto-resumes; a finished one is skipped). The
dense control is the same fine-tune with no reducer, so every row has seen the same extra steps. The training-free
rows near 50 % of the dense FLOPs (ToMe, EViT, DiffRate, and DiffRate's own searched schedule when that run is
there) are evaluated on the control. Writes sweep.{json,md,png} to --out.
"""
import argparse
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from configs import fmnist_learned  # noqa: E402

DATA = "npz:../shared/data/fashion_mnist.npz"
# The training-free rows: the settings of each method around 50 % of the dense FLOPs.
TRAINING_FREE = ["tome:r=16", "tome:r=24", "tome:r=32", "evit:keep=0.7,layers=1-3", "evit:keep=0.5,layers=1-3",
                 "diffrate:merge=197-170-140-110-90-70"]
LEARNED = ["dynamicvit", "stvit", "lookupvit", "tokenlearner", "tokenlearner_v1", "tokenfuser", "patchmerger", "sit",
           "sit_frd", "tome", "evit", "diffrate_search"]


def config_arg(method: str, steps: int, init_from: str) -> str:
  common = f"source={DATA},steps={steps},init_from={init_from}"
  if method == "dense":
    return f"configs/fmnist_vit.py:{common},lr=2e-4"
  if method == "lookupvit":
    return f"configs/fmnist_lookupvit.py:{common}"
  if method not in fmnist_learned.METHODS:
    raise ValueError(f"--only: {method!r} is not one of {['dense'] + LEARNED}")
  return f"configs/fmnist_learned.py:method={method},{common}"


def train(methods, root: str, steps: int, init_from: str):
  for m in methods:
    workdir = os.path.join(root, m)
    if os.path.exists(os.path.join(workdir, "summary.json")):
      print(f"{m}: finished already ({workdir})", flush=True)
      continue
    print(f"=== {m}", flush=True)
    subprocess.run([sys.executable, "train.py", f"--config={config_arg(m, steps, init_from)}",
                    f"--workdir={workdir}"], cwd=ROOT, check=True)


def sweep(root: str, out: str):
  import eval as ev
  from configs import fmnist_vit
  dense = os.path.join(root, "dense")
  done = [m for m in LEARNED if m != "diffrate_search" and os.path.exists(os.path.join(root, m, "summary.json"))]
  specs = list(TRAINING_FREE)
  searched = os.path.join(root, "diffrate_search", "compression_rate.json")
  os.makedirs(out, exist_ok=True)
  if os.path.exists(searched):  # DiffRate's search at a 50 % FLOPs target, run training-free on the control
    shutil.copy(searched, os.path.join(out, "compression_rate.json"))
    specs.append(f"diffrate:schedule={os.path.relpath(os.path.join(out, 'compression_rate.json'), ROOT)}")
  c = fmnist_vit.get_config(f"source={DATA}")
  c.sweep = ";".join(specs)
  c.fine_tuned = ";".join(os.path.join(root, m) for m in done)
  print("fine-tuned rows:", done, flush=True)
  ev.run_sweep(c, dense)
  for name in ("sweep.json", "sweep.md", "sweep.png"):
    shutil.copy(os.path.join(dense, name), os.path.join(out, name))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--root", required=True, help="where the train.py workdirs go (one per method)")
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--init_from", default="benchmarks/fmnist_vit")
  p.add_argument("--only", default="", help="comma-separated methods to train (default: dense and all)")
  p.add_argument("--sweep_only", action="store_true")
  p.add_argument("--out", default="benchmarks/fmnist_learned")
  a = p.parse_args()
  root = os.path.abspath(a.root)
  os.chdir(ROOT)  # the configs' data paths are relative to the repository
  if not a.sweep_only:
    train(a.only.split(",") if a.only else ["dense"] + LEARNED, root, a.steps, a.init_from)
  sweep(root, os.path.join(ROOT, a.out) if not os.path.isabs(a.out) else a.out)


if __name__ == "__main__":
  main()
