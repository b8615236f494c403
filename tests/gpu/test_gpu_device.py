"""Device selection and device-independent files on a real GPU: pycaffe's
set_mode_gpu/set_device, the Python API's cupy arrays, `brewnet train/test/time
--gpu 0`, solver_mode: GPU, and weights/snapshots moving between GPU and CPU."""

import numpy
import pytest
from click.testing import CliRunner
from gpu_env import gpu_mode, require_gpu  # noqa: F401 (gpu_mode is a fixture)

import brewnet
from brewnet.cli import main
from brewnet.layers.kernels import backend

cupy = require_gpu()
pytestmark = pytest.mark.gpu

NET = """
name: "tiny"
layer { name: "data" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "list.txt" batch_size: 4 } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
  convolution_param { num_output: 4 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
  inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc" include { phase: TEST } }
"""


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    import h5py

    monkeypatch.chdir(tmp_path)
    rng = numpy.random.default_rng(0)
    with h5py.File("d.h5", "w") as f:
        f["data"] = rng.normal(size=(16, 2, 6, 6)).astype(numpy.float32)
        f["label"] = rng.integers(0, 3, size=16).astype(numpy.float32)
    (tmp_path / "list.txt").write_text("d.h5\n")
    (tmp_path / "net.prototxt").write_text(NET)
    return tmp_path


def _solver_file(folder, mode="", extra=""):
    path = folder / "solver.prototxt"
    path.write_text(f'net: "net.prototxt"\nbase_lr: 0.05\nmomentum: 0.9\nlr_policy: "fixed"\nmax_iter: 8\n'
                    f'test_iter: 2\ntest_interval: 4\nsnapshot_prefix: "snap"\nrandom_seed: 2\n{mode}{extra}')
    return path


def test_set_mode_gpu_gives_cupy_arrays_through_the_api(tiny, gpu_mode):  # noqa: F811
    net = brewnet.Net("net.prototxt", brewnet.TRAIN)
    out = net.forward()
    assert isinstance(net.blobs["conv"].data, cupy.ndarray)
    assert isinstance(net.params["conv"][0].data, cupy.ndarray)
    assert isinstance(out["loss"], cupy.ndarray)
    host = brewnet.to_numpy(net.blobs["conv"].data)
    assert isinstance(host, numpy.ndarray) and host.shape == net.blobs["conv"].shape
    grads = net.backward()
    assert grads == {} or all(isinstance(v, cupy.ndarray) for v in grads.values())
    brewnet.set_mode_cpu()
    assert backend.get_array_module() is numpy


def test_api_accepts_host_arrays_on_gpu_and_device_arrays_on_cpu(tiny, gpu_mode):  # noqa: F811
    deploy = tiny / "deploy.prototxt"
    deploy.write_text('input: "data" input_shape { dim: 2 dim: 2 dim: 6 dim: 6 }\n'
                      'layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
                      'inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }\n')
    x = numpy.random.default_rng(1).normal(size=(2, 2, 6, 6)).astype(numpy.float32)
    gpu_net = brewnet.Net(str(deploy), phase=brewnet.TEST)
    gpu_net.save(tiny / "w.caffemodel")
    y_gpu = gpu_net.forward(data=x)["ip"]
    brewnet.set_mode_cpu()
    cpu_net = brewnet.Net(str(deploy), str(tiny / "w.caffemodel"), brewnet.TEST)
    y_cpu = cpu_net.forward(data=cupy.asarray(x))["ip"]
    assert isinstance(y_cpu, numpy.ndarray)
    numpy.testing.assert_allclose(brewnet.to_numpy(y_gpu), y_cpu, rtol=1e-5, atol=1e-6)
    all_out = gpu_net.forward_all(data=numpy.concatenate([x, x, x[:1]]))["ip"]
    assert isinstance(all_out, numpy.ndarray) and all_out.shape == (5, 3)


@pytest.mark.parametrize("fmt", ["", "snapshot_format: HDF5\n"])
def test_cli_train_on_gpu_then_resume_and_test_on_cpu(tiny, fmt):
    solver = _solver_file(tiny, extra=fmt)
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--solver", str(solver), "--gpu", "0"])
    assert result.exit_code == 0, result.output
    assert "Using GPU 0" in result.output
    ext = ".h5" if fmt else ""
    assert (tiny / f"snap_iter_8.caffemodel{ext}").is_file()
    # resume the GPU snapshot on the CPU, for 4 more iterations
    solver.write_text(solver.read_text().replace("max_iter: 8", "max_iter: 12"))
    result = runner.invoke(main, ["train", "--solver", str(solver), "--snapshot", f"snap_iter_8.solverstate{ext}"])
    assert result.exit_code == 0, result.output
    assert (tiny / f"snap_iter_12.caffemodel{ext}").is_file()
    # and score the CPU-made weights on the GPU
    result = runner.invoke(main, ["test", "--model", "net.prototxt", "--weights", f"snap_iter_12.caffemodel{ext}",
                                  "--iterations", "2", "--gpu", "0"])
    assert result.exit_code == 0, result.output
    assert "loss = " in result.output
    backend.set_mode_cpu()


def test_solver_mode_gpu_in_the_file_selects_the_gpu(tiny):
    from brewnet.commands.train import select_device
    from brewnet.solver import read_solver_param

    param = read_solver_param(str(_solver_file(tiny, mode="solver_mode: GPU\ndevice_id: 0\n")))
    select_device(None, param)
    try:
        assert backend.mode() == "gpu" and backend.device_id() == 0
        s = brewnet.get_solver(param)
        assert isinstance(s.net.learnable_params[0].data, cupy.ndarray)
        s.step(2)
        assert numpy.isfinite(float(s.net.blobs["loss"].data))
    finally:
        backend.set_mode_cpu()


def test_time_on_gpu(tiny):
    result = CliRunner().invoke(main, ["time", "--model", "net.prototxt", "--iterations", "2", "--gpu", "0"])
    backend.set_mode_cpu()
    assert result.exit_code == 0, result.output
    assert "GPU 0" in result.output and "images/s" in result.output


def test_a_missing_device_is_one_clear_line(tiny):
    count = cupy.cuda.runtime.getDeviceCount()
    result = CliRunner().invoke(main, ["train", "--solver", str(_solver_file(tiny)), "--gpu", str(count)])
    backend.set_mode_cpu()
    assert result.exit_code == 1
    assert f"GPU {count} does not exist" in result.output and "Traceback" not in result.output
