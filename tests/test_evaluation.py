"""The sweep's summary: which method is best at a fraction of the dense FLOPs."""
from tokcomp.evaluation import SweepRow, best_at_flops


def row(spec, acc, gflops):
  return SweepRow(reducer=spec, accuracy=acc, gflops=gflops, flop_ratio=0.0, img_s=1.0, speedup=1.0,
                  tokens_per_layer=[])


def test_best_at_flops_interpolates_each_curve_and_ranks():
  rows = [row("dense", 0.90, 1.0),
          row("a:r=1", 0.88, 0.8), row("a:r=2", 0.80, 0.4),     # at 0.5: 0.80 + 0.08 * (0.1 / 0.4) = 0.82
          row("b:k=1", 0.85, 0.6), row("b:k=2", 0.83, 0.45),    # at 0.5: 0.83 + 0.02 * (0.05 / 0.15)
          row("c:k=1", 0.89, 0.9), row("c:k=2", 0.87, 0.75)]    # never reaches 0.7 or 0.5: left out
  best = best_at_flops(rows, (0.5, 0.7))
  assert [m for m, _ in best["50 %"]] == ["b", "a"]
  assert abs(dict(best["50 %"])["a"] - 0.82) < 1e-12
  assert abs(dict(best["50 %"])["b"] - (0.83 + 0.02 / 3)) < 1e-12
  assert [m for m, _ in best["70 %"]] == ["a"]  # b spans 0.45..0.6 only
  assert abs(best["70 %"][0][1] - 0.86) < 1e-12


def test_best_at_flops_without_spanning_curves_is_empty():
  assert best_at_flops([row("dense", 0.9, 1.0), row("a:r=1", 0.8, 0.9)], (0.5,)) == {}


def test_best_at_flops_does_not_join_fine_tuned_models():
  """Two fine-tuned rows of one method are two models: no curve between them, even when they span the fraction."""
  rows = [row("dense", 0.90, 1.0), row("a:v=1 [fine-tuned]", 0.85, 0.6), row("a:v=2 [fine-tuned]", 0.80, 0.4),
          row("b:r=1", 0.84, 0.6), row("b:r=2", 0.82, 0.4)]
  best = best_at_flops(rows, (0.5,))["50 %"]
  assert [m for m, _ in best] == ["b"]
  assert abs(best[0][1] - 0.83) < 1e-12
