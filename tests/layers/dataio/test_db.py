"""Caffe's on-disk formats: IDX, Datum, LMDB, list files, OpenCV-style resize."""

import gzip

import lmdb
import numpy
import pytest

from brewnet.layers.dataio import db, images
from brewnet.netdef import DefinitionError, caffe_pb2


def test_idx_round_trip_raw_and_gz(tmp_path):
    images = numpy.arange(2 * 3 * 4, dtype=numpy.uint8).reshape(2, 3, 4)
    raw = db.idx_bytes(images)
    assert raw[:4] == b"\x00\x00\x08\x03" and raw[4:8] == (2).to_bytes(4, "big")
    (tmp_path / "a").write_bytes(raw)
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw))
    for name in ("a", "a.gz"):
        out = db.read_idx(str(tmp_path / name))
        assert out.dtype == numpy.uint8 and numpy.array_equal(out, images)
        assert db.idx_magic(str(tmp_path / name)) == 2051
    ints = numpy.array([1, -2, 70000], dtype=numpy.int32)
    (tmp_path / "i").write_bytes(db.idx_bytes(ints))
    assert numpy.array_equal(db.read_idx(str(tmp_path / "i")), ints)


def test_idx_errors(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01abcd")
    with pytest.raises(DefinitionError, match="bad magic"):
        db.read_idx(str(tmp_path / "bad"))
    (tmp_path / "short").write_bytes(db.idx_bytes(numpy.zeros(10, numpy.uint8))[:-1])
    with pytest.raises(DefinitionError, match="expected 10"):
        db.read_idx(str(tmp_path / "short"))


def test_raw_datum_bytes_as_caffe_writes_them():
    # CVMatToDatum sets channels, height, width, data, encoded=false; then the label
    img = numpy.arange(6, dtype=numpy.uint8).reshape(3, 1, 2)
    wire = db.array_to_datum(img, label=7).SerializeToString()
    assert wire == bytes([0x08, 3, 0x10, 1, 0x18, 2, 0x22, 6, 0, 1, 2, 3, 4, 5, 0x28, 7, 0x38, 0])
    back = caffe_pb2.Datum.FromString(wire)
    assert numpy.array_equal(db.datum_to_array(back), img) and back.label == 7


def test_float_and_encoded_datums(tmp_path):
    values = numpy.linspace(-1, 1, 12, dtype=numpy.float32).reshape(3, 2, 2)
    datum = caffe_pb2.Datum.FromString(db.array_to_datum(values, 1).SerializeToString())
    assert not datum.data and numpy.array_equal(db.datum_to_array(datum), values)
    img = numpy.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=numpy.uint8)
    enc = db.encoded_datum(images.encode_image(img, "png"), 3)
    assert enc.encoded and not enc.HasField("channels")
    assert numpy.array_equal(db.datum_to_array(enc), img.transpose(2, 0, 1))  # lossless, BGR kept
    batch = db.datums_to_batch([enc, enc])
    assert batch.shape == (2, 3, 5, 4)
    gray = db.datum_to_array(enc, color=False)
    assert gray.shape == (1, 5, 4)


def test_lmdb_write_read_and_cycle(tmp_path):
    path = str(tmp_path / "x_lmdb")
    with db.DBWriter(path, commit_every=1000) as out:
        for i in range(2500):
            out.put(f"{i:08d}", bytes([i % 256]) * 3)
    env = lmdb.open(path, readonly=True, lock=False)
    assert env.stat()["entries"] == 2500
    env.close()
    reader = db.DBReader(path)
    assert len(reader) == 2500
    assert [k for k, _ in reader.items()][:2] == [b"00000000", b"00000001"]
    for _ in range(2499):
        reader.next()
    assert reader.take(2) == [bytes([2499 % 256]) * 3, b"\x00\x00\x00"]  # wraps to the first
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x_lmdb"]  # no temporary left


def test_lmdb_map_grows(tmp_path):
    out = db.DBWriter(str(tmp_path / "big"))
    out.map_size = 1 << 20
    out.env.set_mapsize(1 << 20)
    for i in range(40):
        out.put(f"{i:08d}", b"\x01" * 100000)
    out.close()
    assert len(db.DBReader(str(tmp_path / "big"))) == 40


def test_writer_refuses_existing_and_aborts_cleanly(tmp_path):
    path = tmp_path / "d"
    path.mkdir()
    with pytest.raises(DefinitionError, match="already exists"):
        db.DBWriter(str(path))
    with pytest.raises(RuntimeError):
        with db.DBWriter(str(tmp_path / "e")) as out:
            out.put("k", b"v")
            raise RuntimeError("interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    with db.DBWriter(str(path), overwrite=True) as out:
        out.put("k", b"v")
    assert len(db.DBReader(str(path))) == 1


def test_reader_errors(tmp_path):
    with pytest.raises(DefinitionError, match="does not exist"):
        db.DBReader(str(tmp_path / "none"), what="layer 'd'")
    with db.DBWriter(str(tmp_path / "empty")):
        pass
    with pytest.raises(DefinitionError, match="is empty"):
        db.DBReader(str(tmp_path / "empty"))
    with pytest.raises(DefinitionError, match="add backend: LMDB"):
        db.DBReader(str(tmp_path / "empty"), backend="leveldb")


def test_list_file(tmp_path):
    good = tmp_path / "list.txt"
    good.write_text("a b/c d.jpg 3\r\nx.png -1\n\n")
    assert db.read_list_file(str(good)) == [("a b/c d.jpg", 3), ("x.png", -1)]
    bad = tmp_path / "bad.txt"
    bad.write_text("x.png 1\nnolabel\n")
    with pytest.raises(DefinitionError, match=r"bad\.txt:2: .*PATH LABEL"):
        db.read_list_file(str(bad))
    bad.write_text("x.png 1\ny.png one\n")
    with pytest.raises(DefinitionError, match=r"bad\.txt:2:"):
        db.read_list_file(str(bad))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(DefinitionError, match="empty"):
        db.read_list_file(str(tmp_path / "empty.txt"))


def test_resize_linear_is_opencvs_fixed_point():
    row = numpy.array([[[0], [255]]], dtype=numpy.uint8)  # 1x2
    # OpenCV INTER_LINEAR to 1x4: taps -0.25->0, 0.25, 0.75, 1.25->1 -> 0, 63.75, 191.25, 255
    assert images.resize_linear(row, 1, 4)[0, :, 0].tolist() == [0, 64, 191, 255]
    img = numpy.arange(16, dtype=numpy.uint8).reshape(4, 4, 1) * 10
    same = images.resize_linear(img, 4, 4)
    assert numpy.array_equal(same, img)
    half = images.resize_linear(img, 2, 2)  # exact halving: OpenCV uses INTER_AREA (2x2 average)
    assert half[:, :, 0].tolist() == [[25, 45], [105, 125]]


def test_mean_blobproto_legacy_dims(tmp_path):
    mean = numpy.arange(12, dtype=numpy.float32).reshape(3, 2, 2)
    blob = db.mean_blobproto(mean)
    assert (blob.num, blob.channels, blob.height, blob.width) == (1, 3, 2, 2) and not blob.HasField("shape")
    (tmp_path / "m.binaryproto").write_bytes(blob.SerializeToString())
    assert numpy.array_equal(db.read_mean_file(str(tmp_path / "m.binaryproto")), mean[None])
