"""benchmarks/accelerator.py: the JAX part on a tiny smoke config (schema, FLOP ratios, img/s, memory), the goals
table on fabricated rows, flag checks, and torch rows recorded as skipped where torch cannot be imported."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "accelerator.py")
_spec = importlib.util.spec_from_file_location("accelerator_bench", SCRIPT)
acc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(acc)

SMOKE = ["--smoke", "--models", "B", "--runs", "2", "--warmup", "1"]
ROW_KEYS = {"impl", "framework", "kind", "model", "model_name", "reducer", "label", "batch", "image_size", "smoke",
            "status", "reason", "spec", "dtype", "img_s", "median_ms", "runs", "warmup", "times_ms", "compile_s",
            "peak_mib", "memory", "xla_gflops", "run", "gflops", "tokens_per_layer", "baseline", "flop_ratio",
            "speedup", "speedup_over_flop_ratio"}
GOAL_KEYS = {"goal", "measured", "target", "op", "met", "missed_by", "missed_by_pct", "same_run", "note"}


def test_jax_part_smoke(tmp_path):
  """Inference rows (dense, ToMe, EViT) and train-step rows (dense, EViT: a cheaper compile than ToMe's) from two
  partial runs, folded by --merge."""
  infer, train = str(tmp_path / "infer.json"), str(tmp_path / "train.json")
  acc.main(SMOKE + ["--part", "jax", "--part_json", infer, "--batches", "2", "--reducers", "tome13,evit",
                    "--no-train"])
  acc.main(SMOKE + ["--part", "jax", "--part_json", train, "--batches", "none", "--reducers", "evit",
                    "--train", "--train_batch", "2", "--runs", "1"])
  out = tmp_path / "merged"
  acc.main(["--smoke", "--merge", infer, train, "--out", str(out)])
  payload = json.loads((out / "accelerator.json").read_text())
  assert payload["smoke"] is True and "SMOKE" in payload["note"]
  assert (out / "accelerator.md").read_text().startswith("**SMOKE (not a measurement)")
  rows = payload["rows"]
  assert [(r["impl"], r["reducer"]) for r in rows] == [
      ("tokcomp", "dense"), ("tokcomp", "tome13"), ("tokcomp", "evit"),
      ("tokcomp train", "dense"), ("tokcomp train", "evit")]
  for r in rows:
    assert set(r) == ROW_KEYS, set(r) ^ ROW_KEYS
    assert r["status"] == "ok" and r["smoke"] is True
    assert math.isfinite(r["img_s"]) and r["img_s"] > 0
    assert r["peak_mib"] > 0 and r["memory"]["peak"] == (r["memory"]["argument"] + r["memory"]["output"]
                                                          + r["memory"]["temp"] - r["memory"]["alias"])
    assert r["compile_s"] > 0 and len(r["tokens_per_layer"]) == 2
    if r["reducer"] == "dense":
      assert r["flop_ratio"] == 1.0 and r["speedup"] == 1.0
    else:
      assert r["flop_ratio"] > 1.0
      assert r["speedup"] == pytest.approx(r["img_s"] / next(
          d["img_s"] for d in rows if d["impl"] == r["impl"] and d["reducer"] == "dense"))
  assert rows[1]["tokens_per_layer"] == [14, 11]  # 17 tokens, ToMe r=3 per block
  goals = {g["goal"].split(",")[0]: g for g in payload["goals"]}
  assert all(set(g) == GOAL_KEYS for g in goals.values())
  assert goals["tokcomp dense img/s ÷ timm SDPA eager"]["measured"] is None  # no torch part in this run
  assert "timm sdpa eager" in goals["tokcomp dense img/s ÷ timm SDPA eager"]["note"]
  compile_goal = goals["compile time EViT 0.7 ÷ dense"]
  assert compile_goal["measured"] == pytest.approx(rows[2]["compile_s"] / rows[0]["compile_s"])
  assert compile_goal["met"] is (compile_goal["measured"] <= 1.3)
  assert "tokcomp train ToMe r=13" in goals["train step ToMe r=13 peak memory ÷ dense"]["note"]


def fake(impl, key, img_s, gflops, batch=256, kind="inference", **kw):
  base = dict(impl=impl, kind=kind, model="B", model_name="ViT-B/16", reducer=key, label=acc.LABELS[key],
              batch=batch, image_size=224, dtype="bfloat16", smoke=False, status="ok", img_s=img_s,
              gflops=gflops, tokens_per_layer=[197], run="r1", peak_mib=kw.pop("peak_mib", 100.0),
              compile_s=kw.pop("compile_s", 10.0))
  base.update(kw)
  return base


def goal_table(rows):
  acc.annotate(rows)
  return {g["goal"]: g for g in acc.goals(rows)}


def test_goals_compute_missed_by():
  rows = [
      fake(acc.JAX, "dense", 900, 35.0), fake(acc.JAX, "tome13", 1500, 20.0, compile_s=14.0),
      fake(acc.JAX, "evit", 1200, 35.0 / 1.5, compile_s=12.0),
      fake(acc.EAGER, "dense", 1000, 35.0), fake(acc.COMPILED, "dense", 1200, 35.0, run="r2"),
      fake(acc.OFFICIAL_TOME, "tome13", 1500, 20.0),
      fake(acc.JAX_TRAIN, "dense", 300, 35.0, batch=128, kind="train", peak_mib=1000.0),
      fake(acc.JAX_TRAIN, "tome13", 450, 20.0, batch=128, kind="train", peak_mib=1100.0),
      fake(acc.JAX, "dense", 1, 35.0, batch=64),  # another batch: the goals use 256
      fake(acc.JAX, "diffrate", 0, 0, status="skipped", reason="no file"),  # not measured: no goal row
  ]
  g = goal_table(rows)
  b, t = "ViT-B/16 b256", "ViT-B/16 b128"

  def check(name, measured, met, missed_by=None):
    goal = g[name]
    assert goal["measured"] == pytest.approx(measured), name
    assert goal["met"] is met, name
    if met:
      assert goal["missed_by"] is None and goal["missed_by_pct"] is None
    else:
      assert goal["missed_by"] == pytest.approx(missed_by), name
      assert goal["missed_by_pct"] == pytest.approx(100 * missed_by / goal["target"]), name

  check(f"tokcomp dense img/s ÷ timm SDPA eager, {b}", 0.9, False, 0.1)
  check(f"tokcomp dense img/s ÷ timm SDPA torch.compile, {b}", 0.75, False, 0.15)
  assert g[f"tokcomp dense img/s ÷ timm SDPA torch.compile, {b}"]["same_run"] is False
  check(f"tokcomp ToMe r=13 speedup ÷ FLOP ratio, {b}", (1500 / 900) / 1.75, True)
  check(f"tokcomp EViT 0.7 speedup ÷ FLOP ratio, {b}", (1200 / 900) / 1.5, False, 0.9 - (1200 / 900) / 1.5)
  check(f"tokcomp ToMe r=13 speedup vs official ToMe r=13's, {b}", 1500 / 900, True)
  check(f"tokcomp EViT 0.7 speedup vs official ToMe r=13's, {b}", 1200 / 900, False, 1.5 - 1200 / 900)
  assert g[f"tokcomp EViT 0.7 speedup vs official ToMe r=13's, {b}"]["target"] == pytest.approx(1.5)
  check(f"train step ToMe r=13 img/s ÷ (FLOP ratio × dense img/s), {t}", 1.5 / 1.75, True)
  check(f"train step ToMe r=13 peak memory ÷ dense, {t}", 1.1, False, 0.1)
  check(f"compile time ToMe r=13 ÷ dense, {b}", 1.4, False, 0.1)
  check(f"compile time EViT 0.7 ÷ dense, {b}", 1.2, True)
  assert not any("DiffRate" in name for name in g)

  del rows[4]  # no compiled timm row: that goal says so instead of a number
  g = goal_table(rows)
  goal = g[f"tokcomp dense img/s ÷ timm SDPA torch.compile, {b}"]
  assert goal["measured"] is None and goal["met"] is None and "timm sdpa compiled" in goal["note"]
  md = acc.markdown(dict(smoke=False, date="d", envs=[], rows=rows, goals=acc.goals(rows)))
  assert "| tokcomp dense img/s ÷ timm SDPA eager, ViT-B/16 b256 | 0.90 | >= 1.00 | missed by 0.10 (10% of the " \
         "target) |" in md
  assert "SMOKE" not in md


def test_flags_refused(capsys):
  for argv, words in [(["--runs", "5"], ["--runs 5", ">= 30", "--smoke"]),
                      (["--models", "S,X"], ["--models", "S, B, L"]),
                      (["--reducers", "tome13,tome99"], ["--reducers", "tome8, tome13, tome16, evit, diffrate"]),
                      (["--batches", "0"], ["--batches", "positive"]),
                      (["--tome_repo", "/nonexistent"], ["--tome_repo", "tome/patch/timm.py"])]:
    with pytest.raises(SystemExit) as e:
      acc.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), (argv, err)
  acc.parse_args(["--runs", "5", "--smoke"])  # smoke may time fewer runs


def test_merge_refuses_smoke_with_measurements():
  with pytest.raises(ValueError, match="smoke and measured"):
    acc.fold([dict(smoke=True, rows=[]), dict(smoke=False, rows=[])])


@pytest.mark.skipif(importlib.util.find_spec("torch") is not None, reason="torch is importable here")
def test_torch_rows_skipped_without_torch(tmp_path):
  """The parent runs the torch part as a child; without torch every planned torch row is there, with the reason."""
  out = subprocess.run([sys.executable, SCRIPT, *SMOKE, "--parts", "torch", "--torch_python", sys.executable,
                        "--batches", "2", "--reducers", "tome13,tome16,evit", "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = json.loads((tmp_path / "accelerator.json").read_text())["rows"]
  assert [(r["impl"], r["reducer"]) for r in rows] == [
      (acc.EAGER, "dense"), (acc.COMPILED, "dense"), (acc.OFFICIAL_TOME, "tome13"), (acc.OFFICIAL_TOME, "tome16")]
  assert all(r["status"] == "skipped" and "No module named 'torch'" in r["reason"] for r in rows)
  assert "No module named 'torch'" in (tmp_path / "accelerator.md").read_text()
