"""Learning-rate policies and update rules against hand-computed values."""

import math

import numpy
import pytest

from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError
from brewnet.solver import lr_policy, updates


def make_param(**fields):
    param = caffe_pb2.SolverParameter()
    stepvalue = fields.pop("stepvalue", [])
    for key, value in fields.items():
        setattr(param, key, value)
    param.stepvalue.extend(stepvalue)
    return param


# -- learning-rate policies ----------------------------------------------------------------

@pytest.mark.parametrize("fields, iteration, expected", [
    (dict(lr_policy="fixed", base_lr=0.1), 57, 0.1),
    (dict(lr_policy="step", base_lr=0.1, gamma=0.5, stepsize=10), 9, 0.1),
    (dict(lr_policy="step", base_lr=0.1, gamma=0.5, stepsize=10), 25, 0.1 * 0.25),
    (dict(lr_policy="exp", base_lr=0.1, gamma=0.9), 3, 0.1 * 0.729),
    (dict(lr_policy="inv", base_lr=0.01, gamma=0.0001, power=0.75), 100, 0.01 * (1 + 0.01) ** -0.75),
    (dict(lr_policy="poly", base_lr=0.1, power=2.0, max_iter=10), 4, 0.1 * 0.36),
    (dict(lr_policy="poly", base_lr=0.1, power=0.5, max_iter=10), 10, 0.0),
    (dict(lr_policy="sigmoid", base_lr=0.1, gamma=0.5, stepsize=4), 6, 0.1 / (1 + math.exp(-1.0))),
])
def test_lr_policies_hand_values(fields, iteration, expected):
    rate, _ = lr_policy.learning_rate(make_param(**fields), iteration, 0)
    # the parameters are float32 in the proto: compare at that precision
    assert rate == pytest.approx(expected, rel=1e-6)


def test_step_policy_sets_current_step():
    param = make_param(lr_policy="step", base_lr=1.0, gamma=0.1, stepsize=3)
    assert lr_policy.learning_rate(param, 7, 0)[1] == 2


def test_multistep_advances_one_step_per_call_like_caffe():
    param = make_param(lr_policy="multistep", base_lr=1.0, gamma=0.5, stepvalue=[2, 4])
    step, rates = 0, []
    for it in range(7):
        rate, step = lr_policy.learning_rate(param, it, step)
        rates.append(rate)
    assert rates == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.25]
    assert step == 2
    # resuming far past both values from a saved current_step of 0 advances only one step per call
    rate, step = lr_policy.learning_rate(param, 100, 0)
    assert (rate, step) == (0.5, 1)


@pytest.mark.parametrize("fields, message", [
    (dict(base_lr=0.1), "lr_policy is not set"),
    (dict(lr_policy="cosine"), "unknown lr_policy 'cosine'"),
    (dict(lr_policy="step", gamma=0.1), "stepsize > 0"),
    (dict(lr_policy="exp", gamma=-1.0), "gamma >= 0"),
])
def test_bad_policies_are_definition_errors(fields, message):
    with pytest.raises(DefinitionError, match=message) as info:
        lr_policy.check_policy(make_param(**fields), "s.prototxt")
    assert str(info.value).startswith("s.prototxt: ")


# -- update rules: one step by hand (float64) ----------------------------------------------

G = numpy.array([0.5, -2.0, 0.0, 4.0])
H = numpy.array([0.1, 0.2, -0.3, 0.0])
H2 = numpy.array([0.01, 0.04, 0.0, 1.0])
LR = 0.1


def run_rule(rule, hist, **fields):
    param = make_param(**fields)
    diff = G.copy()
    hist = [h.copy() for h in hist]
    rule(diff, hist, LR, param, fields.pop("_iter", 4), numpy)
    return diff, hist


def test_sgd_momentum():
    diff, (v,) = run_rule(updates.sgd, [H], momentum=0.9)
    expected = 0.9 * H + LR * G
    numpy.testing.assert_allclose(v, expected, rtol=1e-6)
    numpy.testing.assert_allclose(diff, expected, rtol=1e-6)


def test_nesterov():
    diff, (v,) = run_rule(updates.nesterov, [H], momentum=0.9)
    new_v = 0.9 * H + LR * G
    numpy.testing.assert_allclose(v, new_v, rtol=1e-6)
    numpy.testing.assert_allclose(diff, 1.9 * new_v - 0.9 * H, rtol=1e-6)


def test_adagrad():
    diff, (h,) = run_rule(updates.adagrad, [H2], delta=1e-3)
    new_h = H2 + G ** 2
    numpy.testing.assert_allclose(h, new_h)
    numpy.testing.assert_allclose(diff, LR * G / (numpy.sqrt(new_h) + 1e-3), rtol=1e-6)


def test_rmsprop():
    decay = numpy.float32(0.9)  # a float field: compare with the value the proto holds
    diff, (h,) = run_rule(updates.rmsprop, [H2], rms_decay=0.9, delta=1e-3)
    new_h = decay * H2 + (1 - decay) * G ** 2
    numpy.testing.assert_allclose(h, new_h, rtol=1e-6)
    numpy.testing.assert_allclose(diff, LR * G / (numpy.sqrt(new_h) + 1e-3), rtol=1e-6)


def test_adadelta():
    m = float(numpy.float32(0.95))
    delta = float(numpy.float32(1e-6))
    diff, (g2, u2) = run_rule(updates.adadelta, [H2, H2[::-1].copy()], momentum=0.95, delta=1e-6)
    new_g2 = m * H2 + (1 - m) * G ** 2
    step = G * numpy.sqrt((H2[::-1] + delta) / (new_g2 + delta))
    numpy.testing.assert_allclose(g2, new_g2, rtol=1e-6)
    numpy.testing.assert_allclose(u2, m * H2[::-1] + (1 - m) * step ** 2, rtol=1e-6)
    numpy.testing.assert_allclose(diff, LR * step, rtol=1e-6)


def test_adam_bias_correction_uses_iter_plus_one():
    b1, b2, eps = 0.9, float(numpy.float32(0.999)), float(numpy.float32(1e-8))
    diff, (m, v) = run_rule(updates.adam, [H, H2], momentum=0.9, momentum2=0.999, delta=1e-8)
    t = 5  # iteration 4 -> t = 5
    b1 = float(numpy.float32(b1))
    new_m = b1 * H + (1 - b1) * G
    new_v = b2 * H2 + (1 - b2) * G ** 2
    corr = math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    numpy.testing.assert_allclose(m, new_m, rtol=1e-6)
    numpy.testing.assert_allclose(v, new_v, rtol=1e-6)
    numpy.testing.assert_allclose(diff, LR * corr * new_m / (numpy.sqrt(new_v) + eps), rtol=1e-6)


def test_rules_keep_float32():
    for rule, parts in ((updates.sgd, 1), (updates.nesterov, 1), (updates.adagrad, 1), (updates.rmsprop, 1),
                        (updates.adadelta, 2), (updates.adam, 2)):
        diff = G.astype(numpy.float32)
        hist = [numpy.abs(H).astype(numpy.float32) for _ in range(parts)]
        rule(diff, hist, 0.1, make_param(momentum=0.5 if rule is not updates.adagrad else 0.0), 0, numpy)
        assert diff.dtype == numpy.float32 and all(h.dtype == numpy.float32 for h in hist), rule.__name__


# -- regularization, normalization, clipping -----------------------------------------------

def test_regularize_l2_and_l1():
    data = numpy.array([1.0, -2.0, 0.0, 3.0])
    diff = G.copy()
    updates.regularize(diff, data, 0.01, "L2", numpy)
    numpy.testing.assert_allclose(diff, G + 0.01 * data)
    diff = G.copy()
    updates.regularize(diff, data, 0.01, "L1", numpy)
    numpy.testing.assert_allclose(diff, G + 0.01 * numpy.array([1, -1, 0, 1]))
    diff = G.copy()
    updates.regularize(diff, data, 0.0, "L2", numpy)
    numpy.testing.assert_array_equal(diff, G)


def test_normalize_divides_by_iter_size():
    diff = G.copy()
    updates.normalize(diff, 4)
    numpy.testing.assert_allclose(diff, G / 4)


def test_clip_gradients_uses_the_global_norm():
    a, b = numpy.array([3.0, 0.0]), numpy.array([[0.0, 4.0]])  # global norm 5
    assert updates.clip_gradients([a, b], 10.0, numpy) is None
    assert updates.clip_gradients([a, b], -1, numpy) is None
    norm, scale = updates.clip_gradients([a, b], 2.5, numpy)
    assert norm == pytest.approx(5.0) and scale == pytest.approx(0.5)
    numpy.testing.assert_allclose(a, [1.5, 0.0])
    numpy.testing.assert_allclose(b, [[0.0, 2.0]])
