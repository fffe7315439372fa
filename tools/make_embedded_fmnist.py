"""Writes tokcomp/assets/fashion_mnist_small.npz: a class-balanced real subset of Fashion-MNIST (MIT licence).

The first 500 training and the first 100 test images of every class, in their original order, taken from the
shared offline copy (`../shared/data/fashion_mnist.npz`, see its README). Deterministic: no randomness.

  python tools/make_embedded_fmnist.py --src ../shared/data/fashion_mnist.npz --out tokcomp/assets/fashion_mnist_small.npz
"""
import argparse

import numpy as np


def balanced(labels: np.ndarray, per_class: int) -> np.ndarray:
  idx = np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)])
  return np.sort(idx)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--src", default="../shared/data/fashion_mnist.npz")
  ap.add_argument("--out", default="tokcomp/assets/fashion_mnist_small.npz")
  ap.add_argument("--train_per_class", type=int, default=500)
  ap.add_argument("--test_per_class", type=int, default=100)
  args = ap.parse_args()
  d = np.load(args.src)
  tr, te = balanced(d["train_labels"], args.train_per_class), balanced(d["test_labels"], args.test_per_class)
  np.savez_compressed(args.out, train_images=d["train_images"][tr], train_labels=d["train_labels"][tr],
                      test_images=d["test_images"][te], test_labels=d["test_labels"][te])
  print(f"wrote {args.out}: {len(tr)} train, {len(te)} test")


if __name__ == "__main__":
  main()
