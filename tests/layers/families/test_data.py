"""The data layers: Data, ImageData, HDF5Data (solver fixture ordering), HDF5Output,
MemoryData, WindowData."""

import os

import h5py
import numpy
import pytest
from google.protobuf import text_format

from brewnet.layers.dataio import db
from brewnet.layers.dataio import images as imageio
from brewnet.layers.gradcheck import make_layer, setup_layer
from brewnet.netdef import DefinitionError, caffe_pb2

F32 = numpy.float32


def build(text, n_tops=2, phase=caffe_pb2.TEST, seed=0):
    layer = make_layer(text, phase=phase, dtype=F32, seed=seed)
    bottom, top = setup_layer(layer, [], n_tops=n_tops, dtype=F32)
    return layer, bottom, top


def images(n, c=3, h=4, w=5, seed=0):
    return numpy.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=numpy.uint8)


def write_lmdb(path, datums):
    with db.DBWriter(str(path)) as out:
        for i, d in enumerate(datums):
            out.put(f"{i:08d}", d.SerializeToString())
    return str(path)


def data_layer(source, extra="", batch=4, n_tops=2, phase=caffe_pb2.TEST, seed=0, data_extra=""):
    tops = 'top: "data" top: "label"' if n_tops == 2 else 'top: "data"'
    text = (f'name: "d" type: "Data" {tops} {extra} '
            f'data_param {{ source: "{source}" batch_size: {batch} backend: LMDB {data_extra} }}')
    return build(text, n_tops, phase, seed)


def test_data_layer_raw_cycles_like_caffe(tmp_path):
    x = images(10)
    source = write_lmdb(tmp_path / "db", [db.array_to_datum(a, i) for i, a in enumerate(x)])
    layer, bottom, top = data_layer(source, "transform_param { scale: 0.5 }")
    assert top[0].shape == (4, 3, 4, 5) and top[1].shape == (4,)
    seen = []
    for _ in range(3):
        layer.forward(bottom, top)
        seen.append(top[1].data.tolist())
        idx = top[1].data.astype(int)
        assert numpy.array_equal(top[0].data, x[idx].astype(F32) * F32(0.5))
    assert seen == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    layer.backward(top, [], bottom)  # nothing to do
    layer.close()


def test_data_layer_label_top_optional_and_float_data(tmp_path):
    x = numpy.random.default_rng(2).normal(size=(3, 2, 2, 2)).astype(F32)
    source = write_lmdb(tmp_path / "db", [db.array_to_datum(a, i) for i, a in enumerate(x)])
    layer, bottom, top = data_layer(source, batch=3, n_tops=1)
    layer.forward(bottom, top)
    assert numpy.array_equal(top[0].data, x)


def test_data_layer_encoded_and_force_gray(tmp_path):
    x = images(4, h=6, w=6).transpose(0, 2, 3, 1)  # HWC BGR
    source = write_lmdb(tmp_path / "db", [db.encoded_datum(imageio.encode_image(a, "png"), i) for i, a in enumerate(x)])
    layer, bottom, top = data_layer(source, "transform_param { crop_size: 4 }", batch=4)
    layer.forward(bottom, top)
    assert numpy.array_equal(top[0].data, x.transpose(0, 3, 1, 2)[:, :, 1:5, 1:5].astype(F32))
    layer, bottom, top = data_layer(source, "transform_param { force_gray: true }", batch=2)
    assert top[0].shape == (2, 1, 6, 6)


def test_data_layer_rand_skip_and_train_transform(tmp_path):
    x = images(10)
    source = write_lmdb(tmp_path / "db", [db.array_to_datum(a, i) for i, a in enumerate(x)])
    firsts = set()
    for seed in range(8):
        layer, bottom, top = data_layer(source, "transform_param { crop_size: 3 mirror: true }", batch=2,
                                        phase=caffe_pb2.TRAIN, seed=seed, data_extra="rand_skip: 5")
        layer.forward(bottom, top)
        first = int(top[1].data[0])
        assert first < 5 and int(top[1].data[1]) == first + 1
        firsts.add(first)
        assert top[0].shape == (2, 3, 3, 3)
    assert len(firsts) > 1


def test_data_layer_same_seed_same_batches(tmp_path):
    source = write_lmdb(tmp_path / "db", [db.array_to_datum(a, i) for i, a in enumerate(images(6, h=8, w=8))])
    outs = []
    for _ in range(2):
        layer, bottom, top = data_layer(source, "transform_param { crop_size: 5 mirror: true }",
                                        phase=caffe_pb2.TRAIN, seed=4)
        layer.forward(bottom, top)
        outs.append(top[0].data.copy())
    assert numpy.array_equal(outs[0], outs[1])


def test_data_layer_bad_sources(tmp_path):
    with pytest.raises(DefinitionError, match=r"layer 'd' \(Data\): data source .*nothing does not exist"):
        data_layer(tmp_path / "nothing")
    with db.DBWriter(str(tmp_path / "empty")):
        pass
    with pytest.raises(DefinitionError, match=r"layer 'd'.*empty is empty"):
        data_layer(tmp_path / "empty")
    text = f'name: "d" type: "Data" top: "data" data_param {{ source: "{tmp_path}/empty" batch_size: 1 }}'
    with pytest.raises(DefinitionError, match="backend: LMDB"):
        build(text, 1)
    source = write_lmdb(tmp_path / "junk", [caffe_pb2.Datum(channels=1, height=2, width=2, data=b"abc")])
    with pytest.raises(DefinitionError, match="bad record"):
        data_layer(source)


def test_mnist_lmdb_if_built():
    source = os.path.join(os.path.dirname(__file__), "..", "..", "..", "data", "mnist_train_lmdb")
    if not os.path.isdir(source):
        pytest.skip("data/mnist_train_lmdb not built (scripts/get_mnist.py + convert_mnist.py)")
    layer, bottom, top = data_layer(source, "transform_param { scale: 0.00390625 }", batch=64)
    layer.forward(bottom, top)
    assert top[0].shape == (64, 1, 28, 28) and top[1].data[:5].tolist() == [5, 0, 4, 1, 9]
    assert 0 <= top[0].data.min() and top[0].data.max() < 1


def test_image_data_real_jpegs(fixtures, tmp_path):
    folder = fixtures / "bvlc-caffe" / "examples" / "images"
    lst = tmp_path / "list.txt"
    lst.write_text("cat.jpg 3\nfish-bike.jpg 7\n")
    text = (f'name: "img" type: "ImageData" top: "data" top: "label" image_data_param {{ source: "{lst}" '
            f'root_folder: "{folder}/" batch_size: 3 new_height: 32 new_width: 48 }}')
    layer, bottom, top = build(text)
    layer.forward(bottom, top)
    assert top[0].shape == (3, 3, 32, 48) and top[1].data.tolist() == [3, 7, 3]
    cat = imageio.read_image(str(folder / "cat.jpg"), 32, 48)
    assert numpy.array_equal(top[0].data[0], cat.transpose(2, 0, 1).astype(F32))
    from PIL import Image

    rgb = numpy.asarray(Image.open(folder / "cat.jpg").convert("RGB"))
    full = imageio.read_image(str(folder / "cat.jpg"))
    assert numpy.array_equal(full, rgb[:, :, ::-1])  # BGR, as OpenCV
    gray = text.replace("new_width: 48", "new_width: 48 is_color: false")
    layer, bottom, top = build(gray)
    assert top[0].shape == (3, 1, 32, 48)


def test_image_data_shuffle_and_errors(tmp_path):
    from PIL import Image

    for i in range(5):
        Image.fromarray(numpy.full((4, 4, 3), i * 40, numpy.uint8)).save(tmp_path / f"{i}.png")
    lst = tmp_path / "list.txt"
    lst.write_text("".join(f"{i}.png {i}\n" for i in range(5)))
    text = (f'name: "img" type: "ImageData" top: "data" top: "label" image_data_param {{ source: "{lst}" '
            f'root_folder: "{tmp_path}/" batch_size: 5 shuffle: true }}')
    layer, bottom, top = build(text, seed=3)
    epochs = []
    for _ in range(3):
        layer.forward(bottom, top)
        epochs.append(top[1].data.astype(int).tolist())
        assert sorted(epochs[-1]) == [0, 1, 2, 3, 4]
        assert numpy.array_equal(top[0].data[:, 0, 0, 0], top[1].data * 40)
    assert len({tuple(e) for e in epochs}) > 1  # reshuffled every epoch
    lst.write_text("0.png 0\nmissing.png 1\n")
    layer, bottom, top = build(text.replace("shuffle: true", ""))
    with pytest.raises(DefinitionError, match="could not load image .*missing.png"):
        layer.forward(bottom, top)
    with pytest.raises(DefinitionError, match="does not exist"):
        build(text.replace(str(lst), str(tmp_path / "nolist.txt")))


def solver_data_layer(fixtures):
    text = (fixtures / "caffe-reference" / "solvers" / "net.prototxt").read_text()
    net = text_format.Parse(text, caffe_pb2.NetParameter())
    return text_format.MessageToString(net.layer[0])


def test_hdf5_data_order_on_solver_fixture(fixtures, monkeypatch):
    folder = fixtures / "caffe-reference" / "solvers"
    monkeypatch.chdir(folder)  # the list names data.h5 relative to the working directory
    layer, bottom, top = build(solver_data_layer(fixtures))
    with h5py.File(folder / "data.h5", "r") as f:
        data, label = f["data"][:], f["label"][:]
    assert top[0].shape == (8,) + data.shape[1:] and top[1].shape == (8,)
    for it in range(12):  # 24 rows, batch 8: rows 0-7, 8-15, 16-23, 0-7, ...
        layer.forward(bottom, top)
        rows = (numpy.arange(8) + 8 * it) % 24
        assert numpy.array_equal(top[0].data, data[rows]) and numpy.array_equal(top[1].data, label[rows])


def test_hdf5_data_wraps_across_files_like_caffe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name, rows in (("a.h5", numpy.arange(5)), ("b.h5", numpy.arange(100, 103))):
        with h5py.File(name, "w") as f:
            f["x"] = rows.astype(numpy.float64).reshape(-1, 1)
            f["y"] = rows.astype(numpy.float32)
    (tmp_path / "list.txt").write_text("a.h5\n  b.h5\n")
    text = 'name: "h" type: "HDF5Data" top: "x" top: "y" hdf5_data_param { source: "list.txt" batch_size: 3 }'
    layer, bottom, top = build(text)
    got = []
    for _ in range(6):
        layer.forward(bottom, top)
        got += top[1].data.astype(int).tolist()
    assert got == [0, 1, 2, 3, 4, 100, 101, 102] * 2 + [0, 1]
    assert top[0].shape == (3, 1) and top[0].data.dtype == F32


def test_hdf5_data_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = 'name: "h" type: "HDF5Data" top: "x" hdf5_data_param { source: "list.txt" batch_size: 3 }'
    with pytest.raises(DefinitionError, match=r"layer 'h'.*list.txt does not exist"):
        build(text, 1)
    (tmp_path / "list.txt").write_text("\n")
    with pytest.raises(DefinitionError, match="list.txt is empty"):
        build(text, 1)
    (tmp_path / "list.txt").write_text("gone.h5\n")
    with pytest.raises(DefinitionError, match="gone.h5"):
        build(text, 1)
    with h5py.File("a.h5", "w") as f:
        f["other"] = numpy.zeros(3)
    (tmp_path / "list.txt").write_text("a.h5\n")
    with pytest.raises(DefinitionError, match="no dataset 'x'"):
        build(text, 1)


def test_hdf5_output(tmp_path):
    out = tmp_path / "out.h5"
    layer = make_layer(f'name: "o" type: "HDF5Output" bottom: "a" bottom: "b" '
                       f'hdf5_output_param {{ file_name: "{out}" }}', dtype=F32)
    a = numpy.arange(24, dtype=F32).reshape(2, 3, 4)
    b = numpy.array([1, 2], dtype=F32)
    bottom, top = setup_layer(layer, [a, b], n_tops=0, dtype=F32)
    layer.forward(bottom, top)
    with h5py.File(out, "r") as f:
        assert f["data"].shape == (2, 3, 4, 1) and numpy.array_equal(f["data"][:, :, :, 0], a)
        assert f["label"].shape == (2, 1, 1, 1) and f["label"][:].ravel().tolist() == [1, 2]


def test_memory_data_set_input_arrays():
    text = ('name: "m" type: "MemoryData" top: "data" top: "label" '
            'memory_data_param { batch_size: 2 channels: 1 height: 2 width: 3 }')
    layer, bottom, top = build(text)
    assert top[0].shape == (2, 1, 2, 3) and top[1].shape == (2,)
    with pytest.raises(DefinitionError, match="set_input_arrays"):
        layer.forward(bottom, top)
    data = numpy.arange(4 * 6, dtype=F32).reshape(4, 1, 2, 3)
    labels = numpy.array([10, 11, 12, 13], dtype=F32)
    layer.set_input_arrays(data, labels)
    for start in (0, 2, 0):
        layer.forward(bottom, top)
        assert numpy.array_equal(top[0].data, data[start:start + 2])
        assert top[1].shape == (2, 1, 1, 1) and top[1].data.ravel().tolist() == labels[start:start + 2].tolist()
    with pytest.raises(DefinitionError, match="multiple of batch_size 2"):
        layer.set_input_arrays(data[:3], labels[:3])
    with pytest.raises(DefinitionError, match=r"shape \(N, 1, 2, 3\)"):
        layer.set_input_arrays(numpy.zeros((2, 1, 3, 2), F32), labels[:2])
    layer.reset(data, labels, 2)
    layer.forward(bottom, top)
    layer.forward(bottom, top)
    assert top[1].data.ravel().tolist() == [10, 11]


def test_memory_data_add_arrays_transforms():
    text = ('name: "m" type: "MemoryData" top: "data" top: "label" transform_param { scale: 0.5 } '
            'memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 }')
    layer, bottom, top = build(text)
    data = numpy.arange(8, dtype=numpy.uint8).reshape(2, 1, 2, 2)
    layer.add_arrays(data, [1, 2])
    layer.forward(bottom, top)
    assert numpy.array_equal(top[0].data, data.astype(F32) * F32(0.5))
    with pytest.warns(UserWarning, match="does not transform"):
        layer.set_input_arrays(data.astype(F32), numpy.array([1, 2], F32))


def test_window_data(window_data_dir):
    folder = window_data_dir  # im.png, windows.txt
    text = (f'name: "w" type: "WindowData" top: "data" top: "label" transform_param {{ crop_size: 8 mirror: true '
            f'mean_value: 100 }} window_data_param {{ source: "{folder}/windows.txt" root_folder: "{folder}/" '
            f'batch_size: 4 fg_fraction: 0.5 context_pad: 2 }}')
    layer, bottom, top = build(text, phase=caffe_pb2.TRAIN)
    layer.forward(bottom, top)
    assert top[0].shape == (4, 3, 8, 8)
    labels = top[1].data.tolist()
    assert labels[:2] == [0, 0] and set(labels[2:]) <= {1, 2}
    assert top[0].data.min() >= -100 and top[0].data.max() <= 155
    bad = folder / "bad.txt"
    bad.write_text("0 im.png\n")
    with pytest.raises(DefinitionError, match="expected '#'"):
        build(text.replace("windows.txt", "bad.txt"))
