"""Exact resume: a run restored from a snapshot taken mid-epoch continues
exactly as the uninterrupted run (losses, smoothed loss, test outputs, final
weights), thanks to the ``.resume.json`` sidecar; without the sidecar (a
Caffe-written state) resuming still works, as Caffe's."""

import json
import logging
import shutil

import h5py
import numpy
import pytest
from google.protobuf import text_format

from brewnet import netdef, solver
from brewnet.layers.dataio import db
from brewnet.layers.net import Net
from brewnet.netdef import caffe_pb2

RECORDS, BATCH = 50, 8  # 50 records in batches of 8: epochs never end on a snapshot

NET = """
name: "resume"
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TRAIN }
  transform_param { crop_size: 6 mirror: true scale: 0.00390625 }
  data_param { source: "train_lmdb" batch_size: 8 backend: LMDB prefetch: 3 } }
layer { name: "data" type: "Data" top: "data" top: "label" include { phase: TEST }
  transform_param { crop_size: 6 mirror: true scale: 0.00390625 }
  data_param { source: "train_lmdb" batch_size: 8 backend: LMDB } }
layer { name: "aux" type: "HDF5Data" top: "aux"
  hdf5_data_param { source: "aux_list.txt" batch_size: 8 shuffle: true } }
layer { name: "pool" type: "Pooling" bottom: "data" top: "pool"
  pooling_param { pool: STOCHASTIC kernel_size: 2 stride: 2 } }
layer { name: "ip1" type: "InnerProduct" bottom: "pool" top: "ip1"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "ip_aux" type: "InnerProduct" bottom: "aux" top: "ip_aux"
  inner_product_param { num_output: 10 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sum" type: "Eltwise" bottom: "ip1" bottom: "ip_aux" top: "sum" }
layer { name: "relu" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "drop" type: "Dropout" bottom: "sum" top: "sum" dropout_param { dropout_ratio: 0.4 } }
layer { name: "ip2" type: "InnerProduct" bottom: "sum" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip2" bottom: "label" top: "acc" include { phase: TEST } }
"""

SOLVER = """net: "net.prototxt"
solver_mode: CPU
random_seed: %(seed)d
type: "%(type)s"
base_lr: 0.05 momentum: 0.9 lr_policy: "step" gamma: 0.5 stepsize: 7
max_iter: 15 display: 0 average_loss: 4
test_iter: 2 test_interval: 4
snapshot: 9 snapshot_prefix: "%(prefix)s" snapshot_format: %(format)s
"""


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rng = numpy.random.default_rng(5)
    images = rng.integers(0, 256, (RECORDS, 3, 8, 8), dtype=numpy.uint8)
    labels = rng.integers(0, 3, RECORDS)
    with db.DBWriter(str(tmp_path / "train_lmdb")) as out:
        for i, (image, label) in enumerate(zip(images, labels)):
            out.put(f"{i:08d}", db.array_to_datum(image, label).SerializeToString())
    for name, rows in (("aux_a.h5", 13), ("aux_b.h5", 11)):  # two files, rows not a multiple of the batch
        with h5py.File(tmp_path / name, "w") as f:
            f["aux"] = rng.normal(size=(rows, 4)).astype(numpy.float32)
    (tmp_path / "aux_list.txt").write_text("aux_a.h5\naux_b.h5\n")
    (tmp_path / "net.prototxt").write_text(NET)

    def write_solver(name, seed=3, kind="SGD", fmt="BINARYPROTO", prefix="snaps/run"):
        path = tmp_path / name
        path.write_text(SOLVER % {"seed": seed, "type": kind, "format": fmt, "prefix": prefix})
        return str(path)

    return write_solver


def record(s):
    """Per finished iteration: (this iteration's loss, smoothed loss)."""
    seen = {}
    s.iteration_hooks.append(lambda sv: seen.__setitem__(sv.iter, (sv.loss, sv.smoothed_loss)))
    return seen


def weights(s):
    return {name: [numpy.array(b.data) for b in blobs] for name, blobs in s.net.params.items()}


def close_data(s):
    for net in [s.net, *s.test_nets]:
        for layer in net.layers:
            if hasattr(layer, "close"):
                layer.close()


@pytest.mark.parametrize("kind, fmt, seed", [("SGD", "BINARYPROTO", 3), ("Adam", "HDF5", 77)])
def test_resume_mid_epoch_continues_exactly(setup, kind, fmt, seed):
    whole = solver.get_solver(setup("solver.prototxt", kind=kind, fmt=fmt))
    seen_whole = record(whole)
    whole.solve()
    tests_whole = whole.test(0)
    suffix = ".solverstate.h5" if fmt == "HDF5" else ".solverstate"
    state = f"snaps/run_iter_9{suffix}"
    sidecar = json.loads(open(state + ".resume.json").read())
    assert sidecar["iter"] == 9
    assert sidecar["train_net"]["data"]["position"] == 9 * BATCH % RECORDS  # delivered, not read ahead
    assert set(sidecar["train_net"]) == {"data", "aux", "pool", "drop"}
    assert netdef.read_solverstate(state).iter == 9  # the state file itself stays Caffe's

    # a fresh solver (another seed where parametrized: everything random must come from the sidecar)
    resumed = solver.get_solver(setup("again.prototxt", seed=seed, kind=kind, fmt=fmt, prefix="snaps/again"))
    seen_resumed = record(resumed)
    resumed.solve(state)
    assert resumed.iter == 15
    after = sorted(seen_resumed)
    assert after == list(range(10, 16))
    losses_whole = numpy.array([seen_whole[i] for i in after])
    losses_resumed = numpy.array([seen_resumed[i] for i in after])
    assert numpy.array_equal(losses_whole, losses_resumed)
    for name, arrays in weights(whole).items():
        for a, b in zip(arrays, weights(resumed)[name]):
            assert numpy.array_equal(a, b), name
    tests_resumed = resumed.test(0)
    for name in tests_whole:
        assert numpy.array_equal(tests_whole[name], tests_resumed[name]), name
    close_data(whole)
    close_data(resumed)


def test_without_sidecar_resume_starts_data_over(setup, caplog):
    whole = solver.get_solver(setup("solver.prototxt"))
    seen_whole = record(whole)
    whole.solve()
    state = "snaps/run_iter_9.solverstate"

    exact = solver.get_solver(setup("again.prototxt", prefix="snaps/again"))
    with caplog.at_level(logging.INFO, logger="brewnet"):
        exact.restore(state)
    assert "Restoring data positions and random states from snaps/run_iter_9.solverstate.resume.json" \
        in caplog.text
    exact.step(1)
    assert exact.loss == seen_whole[10][0]

    shutil.move(state + ".resume.json", "elsewhere.json")
    caplog.clear()
    plain = solver.get_solver(setup("plain.prototxt", prefix="snaps/plain"))
    with caplog.at_level(logging.INFO, logger="brewnet"):
        plain.restore(state)
    assert "data layers start from the beginning" in caplog.text
    assert plain.iter == 9
    plain.step(1)
    assert plain.loss != seen_whole[10][0]  # data from record 0: not the uninterrupted batch
    for s in (whole, exact, plain):
        close_data(s)


def test_stale_sidecar_is_ignored(setup, caplog):
    whole = solver.get_solver(setup("solver.prototxt"))
    whole.step(9)
    state = "snaps/run_iter_9.solverstate"
    saved = json.loads(open(state + ".resume.json").read())
    saved["iter"] = 4
    open(state + ".resume.json", "w").write(json.dumps(saved))
    again = solver.get_solver(setup("again.prototxt", prefix="snaps/again"))
    with caplog.at_level(logging.INFO, logger="brewnet"):
        again.restore(state)
    assert "is for iteration 4" in caplog.text and "start from the beginning" in caplog.text
    close_data(whole)
    close_data(again)


def test_caffe_written_state_restores(fixtures, tmp_path, monkeypatch, caplog):
    root = tmp_path / "solvers"  # a writable copy: the solver snapshots into it
    shutil.copytree(fixtures / "caffe-reference" / "solvers", root)
    for path in [root, *root.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    monkeypatch.chdir(root)
    work = root / "sgd_fixed"
    trajectory = numpy.load("sgd_fixed/trajectory.npz")
    s = solver.get_solver("sgd_fixed/solver.prototxt")
    s.param.snapshot_prefix = "sgd_fixed/resumed"
    with caplog.at_level(logging.INFO, logger="brewnet"):
        s.solve("sgd_fixed/snap_iter_6.solverstate")
    assert "data layers start from the beginning, as in Caffe" in caplog.text
    assert s.iter == 12
    for key in (k for k in trajectory.files if k.startswith("final/")):
        _, layer, index = key.split("/")
        numpy.testing.assert_allclose(s.net.params[layer][int(index)].data, trajectory[key], rtol=1e-4, atol=1e-6)
    # our own snapshot of that run has a sidecar next to Caffe's two files
    assert (work / "resumed_iter_12.solverstate.resume.json").is_file()


# -- layer by layer: save after k forwards, restore into a fresh net (other seed), compare ------

def _net(text, seed, phase=caffe_pb2.TRAIN):
    param = caffe_pb2.NetParameter()
    text_format.Parse(text, param)
    return Net(param, phase=phase, rng=seed)


def _continue_alike(text, outputs, before=3, after=4, feed=None):
    first = _net(text, seed=1)
    for _ in range(before):
        feed and feed(first)
        first.forward()
    saved = json.loads(json.dumps(first.resume_state()))  # through JSON, as in the sidecar
    expected = []
    for _ in range(after):
        feed and feed(first)
        first.forward()
        expected.append([numpy.array(first.blobs[name].data) for name in outputs])
    second = _net(text, seed=2)
    feed and feed(second)  # arrays first (MemoryData), then the saved position
    second.restore_resume_state(saved)
    for step in range(after):
        if step:
            feed and feed(second)
        second.forward()
        for name, want in zip(outputs, expected[step]):
            assert numpy.array_equal(second.blobs[name].data, want), (name, step)
    return saved


def test_image_data_shuffle_crop_mirror_resume(tmp_path):
    from PIL import Image

    rng = numpy.random.default_rng(0)
    lines = []
    for i in range(7):
        Image.fromarray(rng.integers(0, 256, (6, 7, 3), dtype=numpy.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png {i % 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    text = f"""
    layer {{ name: "img" type: "ImageData" top: "data" top: "label"
      transform_param {{ crop_size: 4 mirror: true }}
      image_data_param {{ source: "{tmp_path}/list.txt" root_folder: "{tmp_path}/" batch_size: 3 shuffle: true }} }}
    """
    saved = _continue_alike(text, ["data", "label"])
    assert saved["img"]["position"] == 9 % 7


def test_lstm_carried_state_and_dropout_resume():
    text = """
    layer { name: "x" type: "Input" top: "x" top: "cont"
      input_param { shape { dim: 3 dim: 2 dim: 4 } shape { dim: 3 dim: 2 } } }
    layer { name: "lstm" type: "LSTM" bottom: "x" bottom: "cont" top: "h"
      recurrent_param { num_output: 5 weight_filler { type: "constant" value: 0.2 } } }
    layer { name: "rnn" type: "RNN" bottom: "x" bottom: "cont" top: "r"
      recurrent_param { num_output: 3 weight_filler { type: "constant" value: 0.3 } } }
    layer { name: "drop" type: "Dropout" bottom: "h" top: "d" }
    """
    x = numpy.linspace(-1, 1, 24, dtype=numpy.float32).reshape(3, 2, 4)

    def feed(net):
        net.blobs["x"].data[...] = x
        net.blobs["cont"].data[...] = 1  # the sequence never restarts: h/c carry over

    saved = _continue_alike(text, ["h", "r", "d"], feed=feed)
    assert numpy.array(saved["lstm"]["state"]).shape == (2, 2, 5)


def test_memory_data_position_resume():
    text = """
    layer { name: "mem" type: "MemoryData" top: "data" top: "label"
      memory_data_param { batch_size: 2 channels: 1 height: 2 width: 2 } }
    """
    data = numpy.arange(40, dtype=numpy.float32).reshape(10, 1, 2, 2)

    def feed(net):
        if net.layer_by_name("mem").data is None:
            net.layer_by_name("mem").set_input_arrays(data, numpy.arange(10, dtype=numpy.float32))

    saved = _continue_alike(text, ["data", "label"], feed=feed)
    assert saved["mem"] == {"position": 6}


def test_stateless_net_saves_nothing():
    net = _net('layer { name: "x" type: "Input" top: "x" input_param { shape { dim: 2 } } }\n'
               'layer { name: "r" type: "ReLU" bottom: "x" top: "y" }', seed=0)
    assert net.resume_state() == {}


@pytest.mark.parametrize("shuffle", [True, False])
def test_hdf5_data_resume_mid_file(tmp_path, shuffle):
    rng = numpy.random.default_rng(1)
    for name, rows in (("a.h5", 5), ("b.h5", 7)):
        with h5py.File(tmp_path / name, "w") as f:
            f["x"] = rng.normal(size=(rows, 2)).astype(numpy.float32)
    (tmp_path / "list.txt").write_text(f"{tmp_path}/a.h5\n{tmp_path}/b.h5\n")
    text = f"""layer {{ name: "h" type: "HDF5Data" top: "x"
      hdf5_data_param {{ source: "{tmp_path}/list.txt" batch_size: 3 shuffle: {str(shuffle).lower()} }} }}"""
    saved = _continue_alike(text, ["x"], before=3, after=6)  # 9 of 12 rows read: inside the second file
    assert ("row_order" in saved["h"]) == shuffle


def test_window_data_resume(window_data_dir):
    folder = window_data_dir  # im.png, windows.txt
    text = (f'layer {{ name: "w" type: "WindowData" top: "data" top: "label" transform_param {{ crop_size: 8 '
            f'mirror: true }} window_data_param {{ source: "{folder}/windows.txt" root_folder: "{folder}/" '
            f'batch_size: 4 fg_fraction: 0.5 context_pad: 2 }} }}')
    _continue_alike(text, ["data", "label"])
