import os

import jax
import numpy as np
import pytest

from tokcomp import vis
from tokcomp.models import vit


def test_merge_map_paints_group_means_and_darkens_dropped():
  # a 2x2 patch grid of 2x2-pixel patches; CLS at index 0; patches 0 and 3 merged into slot 1, patch 1 in slot 2,
  # patch 2 dropped
  image = np.zeros((4, 4, 1), np.float32)
  image[:2, :2], image[:2, 2:], image[2:, :2], image[2:, 2:] = 0.2, 0.6, 1.0, 0.8
  index = np.array([0, 1, 2, -1, 1])
  out = vis.merge_map(image, index, (2, 2), num_prefix=1, border=False, min_side=4, dropped_alpha=0.5)
  assert out.shape == (4, 4, 3)
  np.testing.assert_allclose(out[0, 0], [0.375] * 3, atol=1e-6)   # (0 + 0.75) / 2 after min-max to [0, 1]
  np.testing.assert_allclose(out[3, 3], [0.375] * 3, atol=1e-6)   # the same group, far away
  np.testing.assert_allclose(out[0, 3], [0.5] * 3, atol=1e-6)     # alone: its own colour
  np.testing.assert_allclose(out[3, 0], [0.5] * 3, atol=1e-6)     # dropped: half of its colour 1.0


def test_merge_map_borders_only_between_groups_and_upscales():
  image = np.random.default_rng(0).uniform(size=(4, 4, 3))
  index = np.array([0, 1, 1, 1, 1])  # everything in one group: no border at all
  out = vis.merge_map(image, index, (2, 2), min_side=16)
  assert out.shape == (16, 16, 3)
  assert np.allclose(out, out[0, 0])
  out = vis.merge_map(image, np.array([0, 1, 2, 1, 2]), (2, 2), min_side=16, border_colour=(1, 0, 0))
  assert np.allclose(out[:, 8], [1, 0, 0]) and not np.allclose(out[:, 3], [1, 0, 0])  # the column change only


@pytest.mark.parametrize("bad, match", [
    (dict(index=np.zeros(4, int)), "index shape"), (dict(grid=(3, 3)), "multiple of grid|index shape"),
    (dict(image=np.zeros((4, 4))), "image shape")])
def test_merge_map_bad_input(bad, match):
  args = dict(image=np.zeros((4, 4, 1)), index=np.zeros(5, int), grid=(2, 2))
  with pytest.raises(ValueError, match=match):
    vis.merge_map(**{**args, **bad})


def test_heatmap_follows_scores():
  out = vis.heatmap(np.zeros((4, 4, 1)), [0.0, 1.0, 2.0, 3.0], (2, 2), alpha=1.0, cmap="gray")
  assert out[0, 0].sum() < out[0, 3].sum() < out[3, 0].sum() < out[3, 3].sum()
  with pytest.raises(ValueError, match="one per patch"):
    vis.heatmap(np.zeros((4, 4, 1)), [0.0, 1.0], (2, 2))
  with pytest.raises(ValueError, match="finite"):
    vis.heatmap(np.zeros((4, 4, 1)), [0.0, np.nan, 1.0, 2.0], (2, 2))


def test_stage_tokens_and_plot_on_a_reduced_vit(tmp_path):
  model = vit.ViT(num_classes=3, patch_size=(4, 4), width=16, depth=3, mlp_dim=32, num_heads=2,
                  reduce="tome:r=5")
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
  params = model.init(jax.random.key(1), images)
  stages = vis.stage_tokens(model, params, images)
  assert [b for b, _ in stages] == [0, 1, 2]
  assert [t.x.shape[1] for _, t in stages] == [12, 7, 4]  # 17 -> 12 -> 7 -> 4 (r is capped at half of 6)
  _, aux = model.apply(params, images)
  np.testing.assert_array_equal(np.asarray(stages[-1][1].index), np.asarray(aux["tokens"].index))
  path = str(tmp_path / "stages.png")
  vis.plot_stages(np.asarray(images[1]), stages, model.grid((16, 16)), path, example=1, title="tome")
  assert os.path.getsize(path) > 1000
  dense = vit.ViT(num_classes=3, patch_size=(4, 4), width=16, depth=3, mlp_dim=32, num_heads=2)
  with pytest.raises(ValueError, match="no reducer"):
    vis.plot_stages(np.asarray(images[0]), vis.stage_tokens(dense, params, images), (4, 4))
