"""Input pipelines: tfds mock data (offline), npz, the embedded subset, sharding, seeds, augmentation."""
import itertools

import grain.python as grain
import jax
import numpy as np
import pytest

from tokcomp import data


def take(loader, n):
  return list(itertools.islice(iter(loader), n))


def test_embedded_subset_is_real_balanced_fashion_mnist():
  tr, te = data.get_source("embedded:fashion_mnist", "train"), data.get_source("embedded:fashion_mnist", "test")
  assert (len(tr), len(te)) == (5000, 1000)
  assert np.bincount(tr.labels).tolist() == [500] * 10 and np.bincount(te.labels).tolist() == [100] * 10
  assert tr[0]["image"].shape == (28, 28, 1) and tr[0]["image"].dtype == np.uint8
  assert 50 < tr.images.mean() < 100  # real clothing images, not noise (Fashion-MNIST mean ~ 73)


def test_tfds_mock_data_source():
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    src = data.get_source("tfds:fashion_mnist", "train")
    assert len(src) == 24
    batches = take(data.train_loader(src, global_batch=8, seed=0), 4)  # past one epoch: endless
  assert batches[0]["image"].shape == (8, 28, 28, 1) and batches[0]["image"].dtype == np.float32
  assert batches[0]["label"].dtype == np.int32


def test_npz_source_and_errors(tmp_path):
  path = tmp_path / "d.npz"
  np.savez(path, train_images=np.zeros((5, 8, 8), np.uint8), train_labels=np.arange(5))
  assert len(data.get_source(f"npz:{path}", "train")) == 5
  with pytest.raises(ValueError, match="no split 'test'"):
    data.get_source(f"npz:{path}", "test")
  with pytest.raises(FileNotFoundError):
    data.get_source("npz:/no/such.npz", "train")
  with pytest.raises(ValueError, match="must start with"):
    data.get_source("hub:x", "train")
  with pytest.raises(ValueError, match="embedded data sets"):
    data.get_source("embedded:imagenet", "train")


def test_shuffle_is_deterministic_by_seed():
  src = data.ArraySource(np.arange(64, dtype=np.uint8).reshape(64, 1, 1), np.arange(64))
  a = [b["label"].tolist() for b in take(data.train_loader(src, global_batch=16, seed=3), 3)]
  b = [b["label"].tolist() for b in take(data.train_loader(src, global_batch=16, seed=3), 3)]
  c = [b["label"].tolist() for b in take(data.train_loader(src, global_batch=16, seed=4), 3)]
  assert a == b and a != c
  assert sorted(sum(a[:4] if len(a) >= 4 else a, [])) != list(range(48))  # shuffled, not in order


def test_hosts_read_disjoint_shards():
  src = data.ArraySource(np.zeros((40, 2, 2), np.uint8), np.arange(40))
  seen = []
  for host in range(2):
    opts = grain.ShardOptions(shard_index=host, shard_count=2, drop_remainder=True)
    loader = data.train_loader(src, global_batch=10, seed=0, shard_options=opts)
    seen.append({int(l) for b in take(loader, 2) for l in b["label"]})
  assert not seen[0] & seen[1]


def test_augmentation_keeps_shape_and_changes_pixels():
  src = data.get_source("embedded:fashion_mnist", "train")
  plain = take(data.train_loader(src, global_batch=32, seed=0), 1)[0]["image"]
  aug = take(data.train_loader(src, global_batch=32, seed=0, crop_pad=2, flip=True), 1)[0]["image"]
  assert aug.shape == plain.shape and not np.allclose(aug, plain)


def test_eval_batches_pad_with_mask():
  src = data.ArraySource(np.zeros((10, 4, 4), np.uint8), np.arange(10))
  batches = list(data.eval_batches(src, batch=4))
  assert [b["image"].shape[0] for b in batches] == [4, 4, 4]
  assert batches[-1]["mask"].tolist() == [True, True, False, False]
  assert np.concatenate([b["label"][b["mask"]] for b in batches]).tolist() == list(range(10))


def test_mixup_mixes_labels_consistently():
  x = np.stack([np.zeros((2, 2, 1)), np.ones((2, 2, 1))]).astype(np.float32)
  y = np.eye(2, dtype=np.float32)
  mx, my = data.mixup(jax.random.key(0), x, y, alpha=0.4)
  lam = float(mx[0, 0, 0, 0])  # image 0 is zeros, image 1 ones: pixel = 1 - lam
  np.testing.assert_allclose(np.asarray(my[0]), [1 - lam, lam], rtol=1e-6)
  assert data.mixup(jax.random.key(0), x, y, 0.0)[0] is x


def test_bad_batch_size():
  with pytest.raises(ValueError, match="global batch 0"):
    data.local_batch_size(0)
