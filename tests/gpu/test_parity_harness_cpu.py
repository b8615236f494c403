"""The parity harness on the CPU alone (numpy against numpy), so that every
case of tests/gpu/parity.py is known to build and run before a GPU session
uses it, and every registered layer type has a case or a stated reason."""

import numpy
import pytest
from gpu_parity import CASES, SKIPPED, Case, run_case

from brewnet import layers


def test_every_registered_layer_type_has_a_case_or_a_reason():
    covered = {c.type for c in CASES}
    # built-in types only: other tests register plugin types of their own
    builtin = {t for t in layers.known_types() if layers.get_layer_class(t).__module__.startswith("brewnet.layers.")}
    missing = sorted(builtin - covered - set(SKIPPED))
    assert not missing, f"layer types without a CPU/GPU parity case: {missing}"
    assert not covered & set(SKIPPED)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_case_runs_and_matches_itself_on_numpy(case, tmp_path):
    run_case(case, numpy, numpy, tmp_path)


def test_harness_catches_a_mismatch(tmp_path, monkeypatch):
    # the second net's layer output is nudged: the comparison must fail
    import gpu_parity

    real_build, built = gpu_parity._build, []

    def build(case, xp, folder, seed):
        net = real_build(case, xp, folder, seed)
        built.append(net)
        if len(built) == 2:
            layer, forward = net.layers[-1], net.layers[-1].forward

            def nudged(bottom, top):
                forward(bottom, top)
                top[0].data[...] += 1e-2

            layer.forward = nudged
        return net

    monkeypatch.setattr(gpu_parity, "_build", build)
    with pytest.raises(AssertionError, match="top t0"):
        run_case(Case("Power", "power_param { power: 2 }"), numpy, numpy, tmp_path)
