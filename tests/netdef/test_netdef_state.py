"""Net state filtering: Caffe's FilterNet / StateMeetsRule."""

import pytest
from google.protobuf import text_format

from brewnet import netdef
from brewnet.netdef import DefinitionError, caffe_pb2


def _rule(text):
    return text_format.Parse(text, caffe_pb2.NetStateRule())


def _state(phase="test", level=0, stages=()):
    return netdef.make_net_state(phase, level, list(stages))


@pytest.mark.parametrize("rule, state, expected", [
    ("", _state(), True),
    ("phase: TRAIN", _state("train"), True),
    ("phase: TRAIN", _state("test"), False),
    ("min_level: 2", _state(level=2), True),
    ("min_level: 2", _state(level=1), False),
    ("max_level: 2", _state(level=3), False),
    ("max_level: 2", _state(level=-5), True),
    ('stage: "a" stage: "b"', _state(stages=["a", "b", "c"]), True),  # needs all stages
    ('stage: "a" stage: "b"', _state(stages=["a"]), False),
    ('not_stage: "a"', _state(stages=["b"]), True),
    ('not_stage: "a" not_stage: "b"', _state(stages=["b"]), False),  # any not_stage breaks it
    ('phase: TEST stage: "deploy" min_level: 1', _state(level=1, stages=["deploy"]), True),
])
def test_state_meets_rule(rule, state, expected):
    assert netdef.state_meets_rule(state, _rule(rule), "layer") is expected


NET = """
state { phase: TRAIN }
layer { name: "always" type: "ReLU" }
layer { name: "train_only" type: "ReLU" include { phase: TRAIN } }
layer { name: "test_only" type: "ReLU" include { phase: TEST } }
layer { name: "either" type: "ReLU" include { phase: TRAIN stage: "x" } include { min_level: 3 } }
layer { name: "not_x" type: "ReLU" exclude { stage: "x" } }
layer { name: "has_blobs" type: "ReLU" blobs { data: 1 } }
"""


def _names(net):
    return [layer.name for layer in net.layer]


def test_filter_net_uses_the_nets_own_state_by_default():
    net = netdef.parse_net(NET)
    filtered = netdef.filter_net(net)
    assert _names(filtered) == ["always", "train_only", "not_x", "has_blobs"]
    assert filtered.state.phase == caffe_pb2.TRAIN
    assert filtered.layer[-1].blobs[0].data == [1]


@pytest.mark.parametrize("state, expected", [
    (_state("test"), ["always", "test_only", "not_x", "has_blobs"]),
    (_state("train", stages=["x"]), ["always", "train_only", "either", "has_blobs"]),
    (_state("test", level=3, stages=["x"]), ["always", "test_only", "either", "has_blobs"]),
])
def test_filter_net_with_given_state(state, expected):
    filtered = netdef.filter_net(netdef.parse_net(NET), state)
    assert _names(filtered) == expected
    assert filtered.state == state


def test_include_and_exclude_together_is_an_error():
    net = netdef.parse_net('layer { name: "both" include { phase: TRAIN } exclude { phase: TEST } }')
    with pytest.raises(DefinitionError, match="layer 'both': specify either include rules or exclude rules"):
        netdef.filter_net(net)


def test_make_net_state_overrides_a_base():
    base = caffe_pb2.NetState(phase=caffe_pb2.TRAIN, level=2, stage=["a"])
    assert netdef.make_net_state(base=base) == base
    state = netdef.make_net_state("TEST", None, ["b"], base=base)
    assert (state.phase, state.level, list(state.stage)) == (caffe_pb2.TEST, 2, ["b"])
