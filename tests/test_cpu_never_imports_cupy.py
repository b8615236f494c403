"""CPU use never imports cupy: a training step, the Python API, the CLI
(train on CPU) and a snapshot all run in a fresh interpreter whose
sys.modules must not hold cupy afterwards. Also: asking for GPU mode where
cupy is missing fails with one line naming the extra to install."""

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent('''
    import os, sys
    sys.path[:] = [p for p in sys.path if p not in ("", ".")]  # the work folder holds no packages
    import h5py, numpy
    os.chdir(sys.argv[1])
    rng = numpy.random.default_rng(0)
    with h5py.File("d.h5", "w") as f:
        f["data"] = rng.normal(size=(8, 5)).astype("float32")
        f["label"] = rng.integers(0, 3, size=8).astype("float32")
    open("list.txt", "w").write("d.h5\\n")
    open("net.prototxt", "w").write("""
    layer { name: "d" type: "HDF5Data" top: "data" top: "label" hdf5_data_param { source: "list.txt" batch_size: 4 } }
    layer { name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
      inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
    layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
    """)
    open("solver.prototxt", "w").write('net: "net.prototxt"\\nbase_lr: 0.1\\nlr_policy: "fixed"\\n'
                                       'max_iter: 2\\nsnapshot_prefix: "snap"\\nrandom_seed: 1\\n')
    import brewnet
    s = brewnet.get_solver("solver.prototxt")
    s.step(2)
    s.snapshot()
    net = brewnet.Net("net.prototxt", "snap_iter_2.caffemodel", brewnet.TRAIN)
    net.forward()
    assert isinstance(net.blobs["ip"].data, numpy.ndarray)
    from click.testing import CliRunner
    from brewnet.cli import main
    result = CliRunner().invoke(main, ["train", "--solver", "solver.prototxt"])
    assert result.exit_code == 0, result.output
    loaded = sorted(m for m in sys.modules if m == "cupy" or m.startswith(("cupy.", "cupy_", "cupyx")))
    print("CUPY_MODULES=" + ",".join(loaded))
''')


ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_cpu_training_never_imports_cupy(tmp_path):
    # the checkout first on the path, as pytest has it (an editable install may predate a package)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("CUPY_MODULES=")]
    assert line == ["CUPY_MODULES="], f"CPU path imported cupy: {line}"
    assert (tmp_path / "snap_iter_2.solverstate").is_file()


def _cupy_importable():
    try:
        import cupy  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(_cupy_importable(), reason="cupy is installed here: the missing-cupy message cannot be seen")
def test_gpu_mode_without_cupy_names_the_extra(tmp_path):
    from click.testing import CliRunner

    import brewnet
    from brewnet.cli import main
    from brewnet.layers.kernels import backend

    with pytest.raises(backend.DeviceError, match=r"pip install 'brewnet\[gpu\]'"):
        brewnet.set_mode_gpu()
    with pytest.raises(backend.DeviceError, match=r"brewnet\[gpu\]"):
        brewnet.set_device(0)
    assert backend.mode() == "cpu"
    (tmp_path / "s.prototxt").write_text('net: "n.prototxt"\n')
    result = CliRunner().invoke(main, ["train", "--solver", str(tmp_path / "s.prototxt"), "--gpu", "0"])
    assert result.exit_code == 1
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "brewnet[gpu]" in lines[0] and "Traceback" not in result.output, result.output
