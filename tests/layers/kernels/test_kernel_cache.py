"""The compiled kernels (layers/kernels/cpu_jit.py) come from numba's on-disk cache in a later process.

Two fresh interpreters share one empty NUMBA_CACHE_DIR and run the same small training
steps (Convolution with its data gradient, MAX and AVE pooling forward and backward, the
fused SGD step) plus one Winograd tile transform called directly (its inline helpers). numba's
own statistics say what each process compiled: the second must have compiled nothing and
loaded every kernel the first compiled, and the cache folder must hold the same files
afterwards. The Winograd kernels that only larger layers reach are checked statically: each
is a module-level function with a disk cache, the property the subprocess test relies on.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from brewnet.layers.kernels import cpu_kernels

pytestmark = pytest.mark.skipif(cpu_kernels.kernels() is None, reason="numba is not installed")

ROOT = pathlib.Path(__file__).resolve().parents[3]

CHILD = textwrap.dedent('''
    import json
    import numpy
    from google.protobuf import text_format
    import brewnet
    from brewnet.layers.kernels import cpu_kernels, im2col
    from brewnet.netdef import caffe_pb2

    im2col.ConvEngine.force_layout = "A"  # conv2's data gradient then runs the compiled col2im

    param = caffe_pb2.SolverParameter()
    text_format.Merge("""
      base_lr: 0.01 momentum: 0.9 weight_decay: 0.0005 lr_policy: "fixed" solver_mode: CPU random_seed: 1
      train_net_param {
        layer { name: "data" type: "DummyData" top: "data" top: "label"
          dummy_data_param { shape { dim: 2 dim: 4 dim: 8 dim: 8 } shape { dim: 2 }
            data_filler { type: "gaussian" std: 1 } data_filler { type: "constant" value: 1 } } }
        layer { name: "conv1" type: "Convolution" bottom: "data" top: "conv1"
          convolution_param { num_output: 6 kernel_size: 3 pad: 1 weight_filler { type: "xavier" } } }
        layer { name: "pool1" type: "Pooling" bottom: "conv1" top: "pool1"
          pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
        layer { name: "conv2" type: "Convolution" bottom: "pool1" top: "conv2"
          convolution_param { num_output: 8 kernel_size: 3 weight_filler { type: "xavier" } } }
        layer { name: "pool2" type: "Pooling" bottom: "conv2" top: "pool2"
          pooling_param { pool: AVE kernel_size: 2 stride: 1 } }
        layer { name: "ip" type: "InnerProduct" bottom: "pool2" top: "ip"
          inner_product_param { num_output: 3 weight_filler { type: "xavier" } } }
        layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
      }""", param)
    brewnet.get_solver(param).step(2)

    kernels = cpu_kernels.kernels()
    # a Winograd row transform: its inline helpers (combine_runs, strided_offsets) compile into it
    src, mat = numpy.ones((1, 6, 3), numpy.float32), numpy.ones((2, 3), numpy.float32)
    kernels.tile_rows(src, mat, numpy.empty((1, 2, 2, 3), numpy.float32), 2)

    stats = {name: [sum(f.stats.cache_hits.values()), sum(f.stats.cache_misses.values())]
             for name, f in vars(kernels).items() if hasattr(f, "stats") and hasattr(f, "py_func")}
    print("STATS=" + json.dumps(stats))
''')

# what the child must reach; more is fine
# (pool1 has horizontal stride 2, pool2 stride 1: cpu_jit has a pooling kernel per stride class)
EXERCISED = {"max_pool_forward_sw2", "max_pool_backward", "ave_pool_forward_sw1", "ave_pool_backward_sw1",
             "col2im_channels_last", "sgd_l2_step", "tile_rows"}


def _run_child(cache_dir):
    # brewnet's own convolution kernels (oneDNN, where installed, would take LeNet's conv1)
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache_dir), BREWNET_JIT="1", BREWNET_ONEDNN="0",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("STATS="))
    return json.loads(line[len("STATS="):])


def _cache_files(cache_dir):
    return sorted(str(p.relative_to(cache_dir)) for p in cache_dir.rglob("*") if p.is_file())


def test_a_second_process_loads_every_kernel_from_the_disk_cache(tmp_path):
    first = _run_child(tmp_path)
    compiled = {name for name, (hits, misses) in first.items() if misses}
    assert EXERCISED <= compiled, f"the first process did not compile {sorted(EXERCISED - compiled)}: {first}"
    files = _cache_files(tmp_path)
    assert any(f.endswith(".nbi") for f in files) and any(f.endswith(".nbc") for f in files), files

    second = _run_child(tmp_path)
    misses = {name: m for name, (h, m) in second.items() if m}
    assert not misses, f"the second process compiled again: {misses}"
    not_loaded = sorted(name for name in compiled if second[name][0] == 0)
    assert not not_loaded, f"the second process did not load {not_loaded} from the cache: {second}"
    assert _cache_files(tmp_path) == files, "the second run changed the cache folder"


def test_every_kernel_is_module_level_and_cached():
    # numba keys a closure's cache entry by its captured cells, and a captured jitted function
    # pickles differently in every process: such a kernel would compile on every run
    from numba.core.dispatcher import Dispatcher

    from brewnet.layers.kernels import cpu_jit

    kernels = {name: f for name, f in vars(cpu_jit).items() if isinstance(f, Dispatcher)}
    assert len(kernels) >= 10, sorted(kernels)
    for name, f in kernels.items():
        assert f.py_func.__module__ == cpu_jit.__name__ and f.py_func.__qualname__ == name, name
        assert f.py_func.__closure__ is None, name
        assert type(f._cache).__name__ == "FunctionCache", f"{name} has no disk cache (cache=True)"


def test_import_brewnet_loads_no_numba_scipy_or_h5py():
    code = "import sys, brewnet; print(sorted(m for m in ('numba', 'scipy', 'h5py') if m in sys.modules))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout
