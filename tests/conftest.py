import os
import sys

import pytest

# Tests run on the CPU; the sharding tests start their own process with 8 fake devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests are compile-bound (tiny models, many shapes): XLA's CPU backend at optimisation level 0 compiles much
# faster (measured 1.6-1.9x less CPU time on test_flextok/test_parity/test_one_d_piece, 2026-11-22). Library code
# and benchmarks keep the default; every tolerance in the suite holds at either level.
# Subprocesses inherit it (they append their device-count flag to XLA_FLAGS).
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # train.py, configs/


@pytest.fixture(scope="session")
def dense_run(tmp_path_factory):
  """A train.py workdir of the tiny runlocal Fashion-MNIST ViT after one step: what fine-tune tests start from."""
  import train
  from configs import fmnist_vit
  workdir = str(tmp_path_factory.mktemp("dense"))
  c = fmnist_vit.get_config("runlocal")
  c.steps = 1
  train.train_and_evaluate(c, workdir)
  return workdir
