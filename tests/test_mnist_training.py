"""End to end on real MNIST: rebuild the IDX files, convert a slice to LMDB, train
LeNet briefly from the LMDB Data layer and check the accuracy rises far above chance."""

import pathlib

import numpy
import pytest

import brewnet
from brewnet.layers.dataio import db

ROOT = pathlib.Path(__file__).resolve().parent.parent
TRAIN_IMAGES, TEST_IMAGES = 6400, 1000


def write_lmdb(images_path, labels_path, count, dest):
    images = db.read_idx(images_path)[:count]
    labels = db.read_idx(labels_path)[:count]
    with db.DBWriter(str(dest)) as writer:
        for i, (image, label) in enumerate(zip(images, labels)):
            writer.put(f"{i:08d}", db.array_to_datum(image[None], int(label)).SerializeToString())


@pytest.mark.slow
def test_lenet_learns_mnist_from_lmdb(mnist_dir, tmp_path, monkeypatch):
    write_lmdb(mnist_dir / "train-images-idx3-ubyte", mnist_dir / "train-labels-idx1-ubyte", TRAIN_IMAGES,
               tmp_path / "data" / "mnist_train_lmdb")
    write_lmdb(mnist_dir / "t10k-images-idx3-ubyte", mnist_dir / "t10k-labels-idx1-ubyte", TEST_IMAGES,
               tmp_path / "data" / "mnist_test_lmdb")
    # the repository's own recipe, shortened: same net file, same data paths (relative to the cwd)
    (tmp_path / "configs" / "lenet").mkdir(parents=True)
    net_text = (ROOT / "configs" / "lenet" / "lenet_train_test.prototxt").read_text()
    (tmp_path / "configs" / "lenet" / "lenet_train_test.prototxt").write_text(net_text)
    solver_text = (ROOT / "configs" / "lenet" / "lenet_solver.prototxt").read_text()
    for field, value in (("max_iter", 300), ("test_iter", TEST_IMAGES // 100), ("snapshot", 0), ("display", 50),
                         ("test_interval", 1000)):
        solver_text = "\n".join(f"{field}: {value}" if line.startswith(f"{field}:") else line
                                for line in solver_text.splitlines())
    (tmp_path / "solver.prototxt").write_text(solver_text + "\nsnapshot_after_train: false\n")
    monkeypatch.chdir(tmp_path)

    solver = brewnet.get_solver("solver.prototxt")
    before = solver.test(0)["accuracy"][0]
    solver.step(300)
    after = solver.test(0)["accuracy"][0]
    assert before < 0.3  # untrained: about chance (0.1)
    assert after > 0.9, f"accuracy after 300 iterations: {after}"
    assert numpy.isfinite(solver.loss)
