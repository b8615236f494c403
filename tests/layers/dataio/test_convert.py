"""The data tools as plain functions (what `brewnet convert_mnist` and friends call):
no click, silent unless given a Reporter, DefinitionError for bad inputs, and no
output under its final name unless complete."""

import gzip
import subprocess
import sys
import textwrap

import numpy
import pytest

from brewnet.layers.dataio import convert, db
from brewnet.netdef import DefinitionError, caffe_pb2


class Recorder(convert.Reporter):
    def __init__(self):
        self.lines, self.labels = [], []

    def info(self, message):
        self.lines.append(message)

    def warn(self, message):
        self.lines.append("warning: " + message)

    def progress(self, iterable, length=None, label=""):
        self.labels.append(label)
        return super().progress(iterable, length, label)


def _mnist(tmp_path, n=5):
    images = numpy.random.default_rng(1).integers(0, 256, (n, 4, 3), dtype=numpy.uint8)
    labels = numpy.array([0, 1, 200, 3, 9][:n], dtype=numpy.uint8)
    (tmp_path / "img.gz").write_bytes(gzip.compress(db.idx_bytes(images)))
    (tmp_path / "lab").write_bytes(db.idx_bytes(labels))
    return images, labels


def test_convert_mnist_function(tmp_path):
    images, labels = _mnist(tmp_path)
    report = Recorder()
    assert convert.convert_mnist(tmp_path / "img.gz", tmp_path / "lab", tmp_path / "db", report=report) == 5
    assert report.lines == ["A total of 5 items. Rows: 4 Cols: 3", "Processed 5 files."]
    assert report.labels == ["converting"]
    values = [caffe_pb2.Datum.FromString(v) for _, v in db.DBReader(str(tmp_path / "db")).items()]
    assert [d.label for d in values] == [0, 1, -56, 3, 9]  # a C char, as Caffe's tool
    assert values[2].data == images[2].tobytes() and (values[2].height, values[2].width) == (4, 3)
    with pytest.raises(DefinitionError, match="already exists"):
        convert.convert_mnist(tmp_path / "img.gz", tmp_path / "lab", tmp_path / "db")
    (tmp_path / "short").write_bytes(db.idx_bytes(labels[:3]))
    with pytest.raises(DefinitionError, match="5 images, but .*short holds 3 labels"):
        convert.convert_mnist(tmp_path / "img.gz", tmp_path / "short", tmp_path / "db2")
    assert not (tmp_path / "db2").exists()


def test_compute_image_mean_function_returns_the_mean(tmp_path):
    x = numpy.random.default_rng(0).integers(0, 256, (3, 1, 2, 2), dtype=numpy.uint8)
    with db.DBWriter(str(tmp_path / "db")) as out:
        for i, a in enumerate(x):
            out.put(f"{i:08d}", db.array_to_datum(a, 0).SerializeToString())
    mean = convert.compute_image_mean(tmp_path / "db")
    assert mean.shape == (1, 1, 2, 2) and mean.dtype == numpy.float32
    assert numpy.allclose(mean[0], x.astype(numpy.float32).mean(axis=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["db"]  # no output file asked for


def test_convert_imageset_function_reports_skips(tmp_path):
    from PIL import Image

    Image.fromarray(numpy.zeros((2, 2, 3), numpy.uint8)).save(tmp_path / "a.png")
    (tmp_path / "list.txt").write_text("a.png 4\nmissing.png 5\n")
    report = Recorder()
    written, skipped = convert.convert_imageset(f"{tmp_path}/", tmp_path / "list.txt", tmp_path / "db", report=report)
    assert (written, skipped) == (1, [f"{tmp_path}/missing.png"])
    assert any(line.startswith("warning: could not open") for line in report.lines)


def test_the_tool_functions_do_not_import_click(tmp_path):
    _mnist(tmp_path)
    code = textwrap.dedent(f"""
        import sys
        from brewnet.layers.dataio import convert, mnist_files
        convert.convert_mnist({str(tmp_path / 'img.gz')!r}, {str(tmp_path / 'lab')!r}, {str(tmp_path / 'db')!r})
        print("click" in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False" and out.stderr == ""
