"""PSNR / SSIM against loop-based NumPy statements of their definitions; the pixel and perceptual losses."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokcomp.models.vit import ViT
from tokcomp.tokenizers import evaluation as E, losses as L


def np_ssim(x, y, size=11, sigma=1.5):
  """Wang et al. 2004 eq. 13 at every 'valid' window position, Gaussian-weighted moments, mean over the map."""
  g = np.exp(-0.5 * ((np.arange(size) - (size - 1) / 2) / sigma) ** 2)
  w = np.outer(g, g) / np.outer(g, g).sum()
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  h, wd = x.shape
  vals = []
  for i in range(h - size + 1):
    for j in range(wd - size + 1):
      a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
      ma, mb = (w * a).sum(), (w * b).sum()
      va, vb = (w * (a - ma) ** 2).sum(), (w * (b - mb) ** 2).sum()
      cov = (w * (a - ma) * (b - mb)).sum()
      vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
  return np.mean(vals)


def test_ssim_and_psnr_match_numpy():
  rng = np.random.default_rng(0)
  target = rng.uniform(size=(3, 16, 14, 2)).astype(np.float32)
  recon = np.clip(target + rng.normal(scale=[[[[0.05]]], [[[0.2]]], [[[0.0]]]], size=target.shape), -0.2, 1.2)
  recon = recon.astype(np.float32)
  got = np.asarray(E.ssim(jnp.asarray(recon), jnp.asarray(target)))
  clipped = np.clip(recon, 0, 1).astype(np.float64)
  want = [np.mean([np_ssim(clipped[b, ..., c], target[b, ..., c].astype(np.float64)) for c in range(2)])
          for b in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert got[2] == pytest.approx(1.0, abs=1e-5) and got[0] > got[1]
  mse = ((clipped - target) ** 2).mean(axis=(1, 2, 3))
  p = np.asarray(E.psnr(jnp.asarray(recon), jnp.asarray(target)))
  np.testing.assert_allclose(p[:2], 10 * np.log10(1 / mse[:2]), rtol=1e-4)
  assert p[2] == 100.0  # exact: capped, not inf


def test_ssim_rejects_images_smaller_than_the_window():
  with pytest.raises(ValueError, match="window"):
    E.ssim(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))


def test_pixel_losses():
  a, b = jnp.full((2, 4, 4, 1), 0.5), jnp.zeros((2, 4, 4, 1))
  assert float(L.pixel_loss(a, b, "l1")) == pytest.approx(0.5)
  assert float(L.pixel_loss(a, b, "l2")) == pytest.approx(0.25)
  assert float(L.pixel_loss(a, b, "l1+l2")) == pytest.approx(0.75)
  with pytest.raises(ValueError, match="kind='l3'"):
    L.pixel_loss(a, b, "l3")


def test_perceptual_loss_on_vit_features():
  vit = ViT(num_classes=10, patch_size=(4, 4), width=32, depth=3, mlp_dim=64, num_heads=2)
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 1))
  params = vit.init(jax.random.key(1), images)
  feats = L.ViTFeatures(vit, params, (0, 2), mean=(0.5,), std=(0.5,))
  out = feats(params, images)
  assert len(out) == 2 and out[0].shape == (2, 17, 32)
  assert float(L.perceptual_loss(feats, images, images)) == pytest.approx(0.0, abs=1e-10)
  noisy = images + 0.3 * jax.random.normal(jax.random.key(2), images.shape)
  assert float(L.perceptual_loss(feats, noisy, images)) > 1e-4
  g = jax.grad(lambda x: L.perceptual_loss(feats, x, images))(noisy)
  assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.abs(g).sum()) > 0
  with pytest.raises(ValueError, match="blocks"):
    L.ViTFeatures(vit, params, (3,), mean=(0.5,), std=(0.5,))
