#!/usr/bin/env python
"""Write data/lenet_hdf5/ for configs/lenet_hdf5 (the GPU check's LeNet run).

From the MNIST IDX files in data/mnist (scripts/get_mnist.py) when present: the
first 20000 training and 2000 test images, pixels scaled to [0, 1) as Caffe's
LeNet transform does, gzip-compressed (a few MiB, small enough to carry to a GPU
machine). Otherwise synthetic digits-shaped data, said so on stdout.

  python scripts/gpu_lenet_hdf5.py [--mnist data/mnist] [--out data/lenet_hdf5]
"""

import argparse
import gzip
import pathlib

import h5py
import numpy

ROOT = pathlib.Path(__file__).resolve().parent.parent


def read_idx(path):
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = numpy.frombuffer(raw[4:4 + 4 * ndim], dtype=">u4").astype(int)
    return numpy.frombuffer(raw[4 + 4 * ndim:], dtype=numpy.uint8).reshape(dims)


def find(folder, name):
    for candidate in (folder / name, folder / (name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def write(out, split, images, labels):
    path = out / f"{split}.h5"
    with h5py.File(path, "w") as f:
        data = (images.astype(numpy.float32) * numpy.float32(0.00390625))[:, None]
        f.create_dataset("data", data=data, compression="gzip", chunks=(64, 1, 28, 28))
        f.create_dataset("label", data=labels.astype(numpy.float32))
    (out / f"{split}_list.txt").write_text(f"data/lenet_hdf5/{split}.h5\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mnist", default=str(ROOT / "data/mnist"))
    ap.add_argument("--out", default=str(ROOT / "data/lenet_hdf5"))
    ap.add_argument("--train", type=int, default=20000)
    ap.add_argument("--test", type=int, default=2000)
    args = ap.parse_args()
    mnist, out = pathlib.Path(args.mnist), pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    paths = [find(mnist, n) for n in names]
    if all(paths):
        ti, tl, vi, vl = (read_idx(p) for p in paths)
        write(out, "train", ti[:args.train], tl[:args.train])
        write(out, "test", vi[:args.test], vl[:args.test])
        print(f"lenet_hdf5: MNIST ({args.train} train, {args.test} test images) in {out}")
    else:
        rng = numpy.random.default_rng(0)
        for split, n in (("train", args.train), ("test", args.test)):
            labels = rng.integers(0, 10, size=n)
            # learnable synthetic data: each class lights its own band of rows
            images = rng.integers(0, 64, size=(n, 28, 28)).astype(numpy.uint8)
            for c in range(10):
                images[labels == c, 2 * c + 4:2 * c + 7, 4:24] = 255
            write(out, split, images, labels)
        print(f"lenet_hdf5: no MNIST IDX files in {mnist}: SYNTHETIC data written to {out}")


if __name__ == "__main__":
    main()
