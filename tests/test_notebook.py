"""notebooks/quickstart.ipynb runs top to bottom against the working tree, and does what it says.

The notebook is executed with nbclient in a fresh kernel of this interpreter (a kernelspec written for the test,
so a user-level "python3" kernelspec pointing elsewhere cannot be picked up); the working tree is first on the
kernel's PYTHONPATH. Its figures go to a temporary folder (TOKCOMP_NOTEBOOK_OUT).
"""
import json
import os
import re
import sys

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


def _stdout(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.output_type == "stream")


def test_committed_notebook_has_no_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for i, cell in enumerate(nb.cells):
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, f"cell {i} has outputs: clear them"


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  kernels = tmp_path / "jupyter" / "kernels" / "tokcomp-test"
  kernels.mkdir(parents=True)
  (kernels / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
      "display_name": "tokcomp test", "language": "python"}))
  out = tmp_path / "out"
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("TOKCOMP_NOTEBOOK_OUT", str(out))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))

  nb = nbformat.read(NOTEBOOK, as_version=4)
  # Raises CellExecutionError (with the cell and its traceback) at the first cell that fails.
  NotebookClient(nb, timeout=600, kernel_name="tokcomp-test", resources={"metadata": {"path": str(tmp_path)}},
                 allow_errors=False).execute()
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert not [o for c in code for o in c.outputs if o.output_type == "error"]
  text = "\n".join(_stdout(c) for c in code)

  # It ran this checkout's tokcomp, not another installed copy.
  assert f"tokcomp from {os.path.join(ROOT, 'tokcomp')}\n" in text, text[:500]
  # 1: the reducers' static counts on the 4-block ViT-Ti/16 at 224 (197 tokens).
  assert "tome:r=24                  tokens after each block: [173, 149, 125, 101]" in text
  assert "evit:keep=0.6,layers=1-2   tokens after each block: [197, 120, 74, 74]" in text
  assert "final x (8, 101, 192)" in text and "sums to 197.0" in text
  # 2: the timing table, one finite positive row per model.
  rows = re.findall(r"^\| (dense|tome:r=24|evit:keep=0\.6,layers=1-2) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|",
                    text, re.M)
  assert [r[0] for r in rows] == ["dense", "tome:r=24", "evit:keep=0.6,layers=1-2"]
  assert all(float(r[3]) > 0 for r in rows)
  # 3: the trained ViT is well above chance (10 %), and the training-free reducers stay near it.
  acc = dict(re.findall(r"^\| (dense|tome:r=6|evit:keep=0\.6,layers=1-2) \| ([\d.]+) % \|", text, re.M))
  assert set(acc) == {"dense", "tome:r=6", "evit:keep=0.6,layers=1-2"}, text
  assert float(acc["dense"]) > 50, acc
  assert all(float(a) > float(acc["dense"]) - 15 for a in acc.values()), acc
  # 4: the timm-layout file loaded with its config read off the shapes.
  assert "'width': 192, 'depth': 2, 'mlp_dim': 768, 'num_heads': 3, 'patch_size': (16, 16)" in text
  assert "tokens per block [13, 9]" in text and "at 96 x 96: (1, 37, 192)" in text
  # 5: PSNR at every kept length, finite, and the full sequence beats a single token.
  psnr = dict(re.findall(r"^\| (\d+) \| ([\d.]+) \|$", text, re.M))
  assert sorted(map(int, psnr)) == [1, 2, 4, 8, 16], text
  assert all(np.isfinite(float(v)) for v in psnr.values())
  assert float(psnr["16"]) > float(psnr["1"]), psnr
  # The saved figures, each also shown inline.
  for name in ("merge_tome_0.png", "merge_evit_0.png", "cls_attention.png", "tokenizer_grid.png"):
    path = out / name
    assert path.exists() and path.stat().st_size > 5000, name
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
  shown = sum(1 for c in code for o in c.outputs if o.output_type == "display_data" and "image/png" in o.data)
  assert shown >= 6, shown
