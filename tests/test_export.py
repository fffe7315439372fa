"""tokcomp.export: a reduced ViT as a serialized jax.export artifact that runs without tokcomp."""
import os
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import assert_close, random_params, tiny_vit
from tokcomp import export

RUNNER = """
import sys, zipfile
import jax, numpy as np
assert not any(m.startswith("tokcomp") for m in sys.modules)
exported = jax.export.deserialize(bytearray(zipfile.ZipFile(sys.argv[1]).read("exported.bin")))
for path in sys.argv[2:]:
  np.save(path + ".out.npy", np.asarray(exported.call(np.load(path))))
assert not any(m.startswith("tokcomp") for m in sys.modules)
"""


def test_symbolic_batch_artifact_runs_in_a_process_without_tokcomp(tmp_path):
  spec = "tome:r=4"
  model = tiny_vit(reduce=spec)
  params = random_params(model)
  art = export.export(model, params, image_shape=(56, 56, 3))
  path = art.save(tmp_path / "model.tcx")
  inputs = {}
  for b in (1, 5):  # one artifact, any batch size
    x = np.asarray(jax.random.normal(jax.random.key(b), (b, 56, 56, 3)), np.float32)
    inputs[b] = str(tmp_path / f"x{b}.npy")
    np.save(inputs[b], x)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  subprocess.run([sys.executable, "-c", RUNNER, path, *inputs.values()], check=True, env=env, cwd=tmp_path)
  for b, p in inputs.items():
    ref = model.apply(params, jnp.asarray(np.load(p)))[0]
    assert_close(np.load(p + ".out.npy"), ref, rtol=1e-5, atol=1e-5, err_msg=f"batch {b}")
  header = export.load(path).header
  assert header["input"]["shape"] == ["b", 56, 56, 3]
  assert header["model"]["reduce"] == spec
  assert header["tokens_per_layer"] == [c.n_mlp for c in model.plan((56, 56))[1]]


def test_fixed_batch_and_reload(tmp_path):
  model = tiny_vit(reduce="evit:keep=0.7,layers=1-2")
  params = random_params(model)
  art = export.load(export.export(model, params, image_shape=(56, 56, 3), batch=3).save(tmp_path / "m.tcx"))
  x = jax.random.normal(jax.random.key(0), (3, 56, 56, 3))
  assert_close(art(x), model.apply(params, x)[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(Exception):  # a fixed batch rejects another size
    art(jnp.zeros((4, 56, 56, 3)))


def test_bad_export_arguments(tmp_path):
  model = tiny_vit()
  params = random_params(model)
  with pytest.raises(ValueError, match="image_shape"):
    export.export(model, params, image_shape=(56, 56))
  with pytest.raises(ValueError, match="batch=0"):
    export.export(model, params, image_shape=(56, 56, 3), batch=0)
  with pytest.raises(ValueError, match="patch"):
    export.export(model, params, image_shape=(50, 50, 3))
  bad = tmp_path / "bad.zip"
  with zipfile.ZipFile(bad, "w") as z:
    z.writestr("x", "y")
  with pytest.raises(ValueError, match="not a tokcomp export artifact"):
    export.load(bad)
