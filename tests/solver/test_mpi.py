"""Data-parallel training over MPI (solver/mpi.py, `brewnet train` under mpiexec).

The sharding of the readers is checked in-process (rank r of N at batch B reads
records r, r+N, ... of one process's batch N*B); the training itself runs
``mpiexec -n 2`` and must give the weights of one process at twice the batch.
Those tests skip when mpi4py or mpiexec is missing (pip install 'brewnet[mpi]').
"""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy
import pytest

from brewnet import netdef
from brewnet.layers.dataio import db, shard
from brewnet.layers.net import Net
from brewnet.netdef import caffe_pb2
from brewnet.solver import mpi

ROOT = Path(__file__).resolve().parents[2]
RECORDS = 40


def _data(tmp_path):
    rng = numpy.random.default_rng(11)
    images = rng.integers(0, 256, (RECORDS, 2, 5, 5), dtype=numpy.uint8)
    labels = rng.integers(0, 3, RECORDS)
    with db.DBWriter(str(tmp_path / "train_lmdb")) as out:
        for i, (image, label) in enumerate(zip(images, labels)):
            out.put(f"{i:08d}", db.array_to_datum(image, label).SerializeToString())
    for name, rows in (("aux_a.h5", 13), ("aux_b.h5", 11)):
        with h5py.File(tmp_path / name, "w") as f:
            f["aux"] = rng.normal(size=(rows, 4)).astype(numpy.float32)
    (tmp_path / "aux_list.txt").write_text("aux_a.h5\naux_b.h5\n")
    return images, labels


NET = """
name: "parallel"
layer { name: "data" type: "Data" top: "data" top: "label"
  transform_param { scale: 0.00390625 }
  data_param { source: "train_lmdb" batch_size: %(batch)d backend: LMDB } }
layer { name: "aux" type: "HDF5Data" top: "aux"
  hdf5_data_param { source: "aux_list.txt" batch_size: %(batch)d shuffle: true } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "conv" top: "ip1"
  inner_product_param { num_output: 6 weight_filler { type: "xavier" } } }
layer { name: "ip_aux" type: "InnerProduct" bottom: "aux" top: "ip_aux"
  inner_product_param { num_output: 6 weight_filler { type: "gaussian" std: 0.3 } } }
layer { name: "sum" type: "Eltwise" bottom: "ip1" bottom: "ip_aux" top: "sum" }
layer { name: "relu" type: "ReLU" bottom: "sum" top: "sum" }
layer { name: "ip2" type: "InnerProduct" bottom: "sum" top: "ip2"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip2" bottom: "label" top: "loss" }
"""

SOLVER = """net: "%(net)s"
solver_mode: CPU
random_seed: 7
type: "%(type)s"
base_lr: %(lr)s momentum: 0.9 weight_decay: 0.001 lr_policy: "fixed"
iter_size: %(iter_size)d
max_iter: 5 display: 1
snapshot_after_train: true snapshot_prefix: "%(prefix)s"
"""


# -- sharding, in-process ---------------------------------------------------------

def _batches(tmp_path, batch, rank, size, iters=7):
    shard.set_shard(rank, size)
    try:
        (tmp_path / f"net{batch}.prototxt").write_text(NET % {"batch": batch})
        net = Net(str(tmp_path / f"net{batch}.prototxt"), phase=caffe_pb2.TRAIN)
    finally:
        shard.set_shard(0, 1)
    out = []
    for _ in range(iters):
        net.forward()
        out.append({name: numpy.array(net.blobs[name].data) for name in ("data", "label", "aux")})
    for layer in net.layers:
        if hasattr(layer, "close"):
            layer.close()
    return out


def test_ranks_read_every_nth_record_of_the_global_batch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _data(tmp_path)
    from brewnet.layers.net import set_random_seed

    set_random_seed(3)
    whole = _batches(tmp_path, 6, 0, 1)
    parts = []
    for rank in range(3):
        set_random_seed(3)  # the same seed on every rank: the same shuffles
        parts.append(_batches(tmp_path, 2, rank, 3))
    for i, batch in enumerate(whole):
        for name in batch:
            for rank in range(3):
                numpy.testing.assert_array_equal(parts[rank][i][name], batch[name][rank::3], err_msg=f"{name} {i}")


def test_test_nets_read_unsharded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    labels = _data(tmp_path)[1]
    (tmp_path / "net.prototxt").write_text(NET % {"batch": 4})
    shard.set_shard(1, 2)
    try:
        net = Net(str(tmp_path / "net.prototxt"), phase=caffe_pb2.TEST)
    finally:
        shard.set_shard(0, 1)
    net.forward()
    assert list(net.blobs["label"].data.astype(int)) == [int(label) for label in labels[:4]]


def test_image_data_shards(tmp_path):
    from brewnet.layers.dataio import images

    rng = numpy.random.default_rng(2)
    lines = []
    for i in range(9):
        path = tmp_path / f"im{i}.png"
        path.write_bytes(images.encode_image(rng.integers(0, 256, (4, 4, 3), dtype=numpy.uint8), ".png"))
        lines.append(f"im{i}.png {i % 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    net_text = """layer { name: "d" type: "ImageData" top: "data" top: "label"
      image_data_param { source: "%s" root_folder: "%s/" batch_size: %%d shuffle: true } }""" % (
        tmp_path / "list.txt", tmp_path)

    def labels_and_pixels(batch, rank, size):
        from brewnet.layers.net import set_random_seed

        set_random_seed(5)
        shard.set_shard(rank, size)
        try:
            (tmp_path / f"in{batch}.prototxt").write_text(net_text % batch)
            param = str(tmp_path / f"in{batch}.prototxt")
            net = Net(param, phase=caffe_pb2.TRAIN)
        finally:
            shard.set_shard(0, 1)
        seen = []
        for _ in range(5):  # past the end of an epoch: reshuffled alike
            net.forward()
            seen.append(numpy.array(net.blobs["data"].data))
        net.layers[0].close()
        return seen

    whole = labels_and_pixels(4, 0, 1)
    halves = [labels_and_pixels(2, r, 2) for r in range(2)]
    for i, batch in enumerate(whole):
        for r in range(2):
            numpy.testing.assert_array_equal(halves[r][i], batch[r::2])


def test_launcher_detection():
    assert not mpi.launched({})
    assert mpi.launched({"PMI_RANK": "0", "PMI_SIZE": "2"})
    assert mpi.launched({"OMPI_COMM_WORLD_SIZE": "2"})


def test_plain_train_never_imports_mpi4py(tmp_path):
    code = ("import sys; from click.testing import CliRunner; from brewnet.cli import main; "
            "r = CliRunner().invoke(main, ['train', '--solver', 'missing.prototxt']); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py imported'; print('ok')")
    env = {k: v for k, v in os.environ.items() if not mpi.launched({k: v})}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


def test_missing_mpi4py_is_one_line_error(tmp_path):
    # a launcher's environment without mpi4py importable: one line naming the extra
    (tmp_path / "block").mkdir()
    (tmp_path / "block" / "mpi4py.py").write_text("raise ImportError('No module named mpi4py')\n")
    env = dict(os.environ, PMI_RANK="0", PMI_SIZE="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "block"), str(ROOT)]))
    result = subprocess.run([sys.executable, "-m", "brewnet", "train", "--solver", "s.prototxt"], cwd=tmp_path,
                            env=env, capture_output=True, text=True)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "brewnet[mpi]" in lines[0] and lines[0].startswith("brewnet: error:"), result.stderr


# -- training under mpiexec -----------------------------------------------------------

def _mpiexec():
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return None
    return shutil.which("mpiexec", path=os.pathsep.join([os.path.dirname(sys.executable), os.environ["PATH"]]))


needs_mpi = pytest.mark.skipif(_mpiexec() is None, reason="needs mpi4py and mpiexec (pip install 'brewnet[mpi]')")


def _env():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", BREWNET_THREADS="1")
    return {k: v for k, v in env.items() if not mpi.launched({k: v})}


def _solver(tmp_path, name, batch, kind, iter_size):
    (tmp_path / f"{name}.net.prototxt").write_text(NET % {"batch": batch})
    path = tmp_path / f"{name}.solver.prototxt"
    lr = "0.01" if kind == "Adam" else "0.1"
    path.write_text(SOLVER % {"net": f"{name}.net.prototxt", "type": kind, "lr": lr, "iter_size": iter_size,
                              "prefix": f"snaps/{name}"})
    return str(path)


def _weights(tmp_path, name):
    weights = netdef.read_weights(str(tmp_path / f"snaps/{name}_iter_5.caffemodel"))
    return {layer.name: [netdef.blob_to_array(b) for b in layer.blobs] for layer in weights.layer if len(layer.blobs)}


@needs_mpi
@pytest.mark.parametrize("kind, iter_size", [("SGD", 1), ("SGD", 2), ("Adam", 1), ("Adam", 2)])
def test_two_ranks_train_as_one_process_at_twice_the_batch(tmp_path, kind, iter_size):
    _data(tmp_path)
    single = _solver(tmp_path, "single", 4, kind, iter_size)
    double = _solver(tmp_path, "double", 2, kind, iter_size)
    runs = [subprocess.Popen([sys.executable, "-m", "brewnet", "train", "--solver", single, "--log", "none"],
                             cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
            subprocess.Popen([_mpiexec(), "-n", "2", sys.executable, "-m", "brewnet", "train", "--solver", double,
                              "--log", "none"], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)]
    outputs = [run.communicate(timeout=120) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0, err
    err = outputs[1][1]
    assert "Data-parallel training on 2 MPI ranks" in err
    assert err.count("Optimization Done.") == 1  # rank 0 alone logs
    assert not (tmp_path / "snaps" / "double_iter_5.caffemodel.h5").exists()
    one, two = _weights(tmp_path, "single"), _weights(tmp_path, "double")
    assert one.keys() == two.keys() == {"conv", "ip1", "ip_aux", "ip2"}
    for name in one:
        for a, b in zip(one[name], two[name]):
            numpy.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6, err_msg=name)


@needs_mpi
def test_a_failing_rank_ends_every_rank_with_one_line(tmp_path):
    _data(tmp_path)
    double = _solver(tmp_path, "double", 2, "SGD", 1)
    # each rank runs in a folder of its own; rank 1's lacks the LMDB (a data source missing on one machine)
    for rank in range(2):
        folder = tmp_path / f"rank{rank}"
        folder.mkdir()
        for name in ("double.solver.prototxt", "double.net.prototxt", "aux_list.txt", "aux_a.h5", "aux_b.h5"):
            shutil.copy(tmp_path / name, folder / name)
    shutil.copytree(tmp_path / "train_lmdb", tmp_path / "rank0" / "train_lmdb")
    wrapper = tmp_path / "rank.sh"
    wrapper.write_text(f'#!/bin/sh\ncd rank$PMI_RANK && exec {sys.executable} -m brewnet train '
                       '--solver double.solver.prototxt --log none\n')
    wrapper.chmod(0o755)
    start = time.monotonic()
    result = subprocess.run([_mpiexec(), "-n", "2", str(wrapper)], cwd=tmp_path, env=_env(), capture_output=True,
                            text=True, timeout=60)
    assert time.monotonic() - start < 30
    assert result.returncode != 0
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("brewnet: error:")]
    assert len(errors) == 1, result.stdout + result.stderr
    assert errors[0].startswith("brewnet: error: rank 1:") and "train_lmdb" in errors[0], errors[0]


@needs_mpi
def test_two_ranks_resume_exactly(tmp_path):
    _data(tmp_path)
    solver = Path(_solver(tmp_path, "double", 2, "SGD", 1))
    solver.write_text(solver.read_text() + "snapshot: 3\n")

    def train(*extra):
        result = subprocess.run([_mpiexec(), "-n", "2", sys.executable, "-m", "brewnet", "train", "--solver",
                                 str(solver), "--log", "none", *extra], cwd=tmp_path, env=_env(), capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return result.stderr

    train()
    whole = _weights(tmp_path, "double")
    (tmp_path / "snaps" / "double_iter_5.caffemodel").unlink()
    err = train("--snapshot", "snaps/double_iter_3.solverstate")
    assert "Restoring data positions" in err
    resumed = _weights(tmp_path, "double")
    for name in whole:
        for a, b in zip(whole[name], resumed[name]):
            numpy.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=name)


def test_window_data_shards(window_data_dir, tmp_path):
    from brewnet.layers.net import set_random_seed

    text = (f'layer {{ name: "w" type: "WindowData" top: "data" top: "label" transform_param {{ crop_size: 8 '
            f'mirror: true }} window_data_param {{ source: "{window_data_dir}/windows.txt" root_folder: '
            f'"{window_data_dir}/" batch_size: %d fg_fraction: 0.5 context_pad: 2 }} }}')

    def batches(batch, rank, size):
        set_random_seed(9)
        shard.set_shard(rank, size)
        try:
            (tmp_path / f"w{batch}.prototxt").write_text(text % batch)
            net = Net(str(tmp_path / f"w{batch}.prototxt"), phase=caffe_pb2.TRAIN)
        finally:
            shard.set_shard(0, 1)
        seen = []
        for _ in range(3):
            net.forward()
            seen.append((numpy.array(net.blobs["data"].data), numpy.array(net.blobs["label"].data)))
        net.layers[0].close()
        return seen

    whole = batches(4, 0, 1)
    halves = [batches(2, r, 2) for r in range(2)]
    for i, (data, labels) in enumerate(whole):
        for r in range(2):
            numpy.testing.assert_array_equal(halves[r][i][0], data[r::2])
            numpy.testing.assert_array_equal(halves[r][i][1], labels[r::2])


# -- brewnet's own launcher: --ranks N, --gpu 0,1 (brewnet/launch.py) -------------------------

def test_find_mpiexec_order_and_one_line_error(tmp_path):
    from brewnet import launch
    from brewnet.netdef.errors import DefinitionError

    bin_dir, path_dir = tmp_path / "venv_bin", tmp_path / "path_bin"
    bin_dir.mkdir()
    path_dir.mkdir()
    python = bin_dir / "python"
    python.write_text("")
    for folder in (bin_dir, path_dir):
        tool = folder / "mpiexec"
        tool.write_text("#!/bin/sh\n")
        tool.chmod(0o755)
    env = {"PATH": str(path_dir)}
    assert launch.find_mpiexec(env, str(python)) == str(bin_dir / "mpiexec")  # beside Python first
    (bin_dir / "mpiexec").unlink()
    assert launch.find_mpiexec(env, str(python)) == str(path_dir / "mpiexec")  # then PATH
    chosen = tmp_path / "my_mpirun"
    chosen.write_text("#!/bin/sh\n")
    chosen.chmod(0o755)
    assert launch.find_mpiexec(dict(env, BREWNET_MPIEXEC=str(chosen)), str(python)) == str(chosen)
    (path_dir / "mpiexec").unlink()
    with pytest.raises(DefinitionError, match=r"brewnet\[mpi\]"):
        launch.find_mpiexec(env, str(python))
    with pytest.raises(DefinitionError, match="BREWNET_MPIEXEC"):
        launch.find_mpiexec(dict(env, BREWNET_MPIEXEC=str(tmp_path / "missing")), str(python))


def test_ranks_share_the_cores_and_run_brewnet_train():
    from brewnet import launch

    assert launch.rank_environment(2, {}, cpus=8)["BREWNET_THREADS"] == "4"
    assert launch.rank_environment(16, {}, cpus=8)["BREWNET_THREADS"] == "1"
    assert launch.rank_environment(2, {"BREWNET_THREADS": "3"}, cpus=8)["BREWNET_THREADS"] == "3"
    assert launch.command("mpiexec", 2, ["--solver", "s"], "py") == [
        "mpiexec", "-n", "2", "py", "-m", "brewnet", "train", "--solver", "s"]
    assert launch.rank_count([0, 1], None) == 2 and launch.rank_count([0], 3) == 3
    assert launch.rank_count(None, None) == 1


def test_missing_mpiexec_is_one_line_error(tmp_path):
    (tmp_path / "s.prototxt").write_text("")
    env = dict(_env(), BREWNET_MPIEXEC=str(tmp_path / "no_mpiexec"))
    result = subprocess.run([sys.executable, "-m", "brewnet", "train", "--solver", "s.prototxt", "--ranks", "2"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("brewnet: error: BREWNET_MPIEXEC="), result.stderr


def test_gpu_list_without_a_gpu_is_one_line_error_before_any_rank(tmp_path):
    pytest.importorskip("mpi4py")
    try:
        import cupy  # noqa: F401

        pytest.skip("cupy is installed: this checks a machine without one")
    except ImportError:
        pass
    (tmp_path / "s.prototxt").write_text("")
    env = dict(_env(), BREWNET_MPIEXEC=str(tmp_path / "no_mpiexec"))  # never reached
    result = subprocess.run([sys.executable, "-m", "brewnet", "train", "--solver", "s.prototxt", "--gpu", "0,1"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "brewnet[gpu]" in lines[0] and lines[0].startswith("brewnet: error:"), result.stderr


@needs_mpi
def test_ranks_flag_trains_as_mpiexec_does(tmp_path):
    _data(tmp_path)
    solver = _solver(tmp_path, "double", 2, "SGD", 2)
    base = [sys.executable, "-m", "brewnet", "train", "--solver", solver, "--log", "none"]
    env = dict(_env(), BREWNET_THREADS="1")  # the same threads in both runs: the same float sums
    result = subprocess.run([_mpiexec(), "-n", "2", *base], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    by_mpiexec = _weights(tmp_path, "double")
    (tmp_path / "snaps" / "double_iter_5.caffemodel").unlink()
    result = subprocess.run([*base, "--ranks", "2"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "starting 2 ranks" in result.stderr and "Data-parallel training on 2 MPI ranks" in result.stderr
    assert "Gradient reduction: host MPI (CPU ranks)" in result.stderr
    by_launcher = _weights(tmp_path, "double")
    for name in by_mpiexec:
        for a, b in zip(by_mpiexec[name], by_launcher[name]):
            numpy.testing.assert_array_equal(b, a, err_msg=name)


@needs_mpi
def test_launcher_passes_sighup_and_sigint_to_the_ranks(tmp_path):
    import queue
    import signal
    import threading

    _data(tmp_path)
    solver = Path(_solver(tmp_path, "double", 2, "SGD", 1))
    solver.write_text(solver.read_text().replace("max_iter: 5 display: 1", "max_iter: 1000000 display: 20"))
    run = subprocess.Popen([sys.executable, "-m", "brewnet", "train", "--solver", str(solver), "--log", "none",
                            "--ranks", "2"], cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in run.stderr], daemon=True).start()
    seen = []

    def wait_for(text):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            seen.append(line)
            if text in line:
                return
        run.kill()
        pytest.fail(f"no '{text}' in the output:\n" + "".join(seen))

    try:
        wait_for("Iteration 20,")
        run.send_signal(signal.SIGHUP)  # the ranks snapshot and go on (--sighup-effect snapshot)
        wait_for("Snapshotting solver state")
        wait_for("Iteration")
        run.send_signal(signal.SIGINT)  # the ranks stop; rank 0 writes the final snapshot
        assert run.wait(timeout=60) == 0, "".join(seen)
    finally:
        if run.poll() is None:
            run.kill()
    wait_for("Optimization stopped early")
    states = sorted((tmp_path / "snaps").glob("double_iter_*.solverstate"))
    assert len(states) == 2, states  # one from SIGHUP, one from SIGINT (snapshot_after_train)


def _processes_running(text):
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


@needs_mpi
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_launcher_killed_outright_leaves_no_ranks(tmp_path):
    import signal

    _data(tmp_path)
    solver = Path(_solver(tmp_path, "orphans", 2, "SGD", 1))
    solver.write_text(solver.read_text().replace("max_iter: 5 display: 1", "max_iter: 1000000 display: 20"))
    run = subprocess.Popen([sys.executable, "-m", "brewnet", "train", "--solver", str(solver), "--log", "none",
                            "--ranks", "2"], cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    try:
        for line in run.stderr:
            if "Iteration 20," in line:
                break
        assert _processes_running(str(solver)), "no ranks running"
        run.send_signal(signal.SIGKILL)
        run.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _processes_running(str(solver)) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _processes_running(str(solver))
        assert not left, f"still running: {left}"
    finally:
        for pid in _processes_running(str(solver)):
            os.kill(pid, signal.SIGKILL)
