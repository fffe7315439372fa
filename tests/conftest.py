import os
import sys

import pytest

# Tests run on the CPU; the sharding tests start their own process with 8 fake devices.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
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
