"""Every registered layer type: the same net on numpy and on cupy gives the
same tops and gradients (cases and reasons for skips in gpu_parity.py)."""

import numpy
import pytest
from gpu_env import require_gpu
from gpu_parity import CASES, run_case

cupy = require_gpu()
pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_layer_matches_cpu_on_gpu(case, tmp_path):
    run_case(case, numpy, cupy, tmp_path)


def test_parity_nets_really_hold_cupy_arrays(tmp_path):
    import gpu_parity

    net = gpu_parity._build(CASES[0], cupy, tmp_path, 0)
    assert isinstance(net.blobs["t0"].data, cupy.ndarray)
