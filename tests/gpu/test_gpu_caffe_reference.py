"""Every caffe-reference layer case on the GPU, with the CPU test's own logic
and tolerances (tests/test_caffe_reference.py, imported by path): only the
Net it builds is forced onto cupy."""

import pytest
from gpu_env import gpu_mode, load_test_module, require_gpu  # noqa: F401 (gpu_mode is a fixture)

cupy = require_gpu()
pytestmark = pytest.mark.gpu
reference = load_test_module("test_caffe_reference.py", "brewnet_cpu_caffe_reference")


@pytest.mark.parametrize("case", reference._cases())
def test_layer_case_matches_caffe_on_gpu(case, fixtures, gpu_mode, monkeypatch):  # noqa: F811
    built = []
    core_net = reference.Net

    def gpu_net(*args, **kwargs):
        kwargs["xp"] = cupy
        net = core_net(*args, **kwargs)
        built.append(net)
        return net

    monkeypatch.setattr(reference, "Net", gpu_net)
    reference.test_layer_case_matches_caffe(case, fixtures)
    if case is not None:
        assert built and all(isinstance(b.data, cupy.ndarray) for b in built[0].blobs.values())
