"""Which layers a net keeps for a given NetState (Caffe's Net::FilterNet / StateMeetsRule)."""

import logging

from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError

log = logging.getLogger("brewnet")

_PHASES = {"train": caffe_pb2.TRAIN, "test": caffe_pb2.TEST}


def make_net_state(phase=None, level=None, stages=None, base=None):
    """A NetState: ``base`` (e.g. net_param.state) with the given values overriding it.

    ``phase`` may be caffe_pb2.TRAIN/TEST or "train"/"test"; ``stages`` replaces the
    base's stages when given.
    """
    state = caffe_pb2.NetState()
    if base is not None:
        state.CopyFrom(base)
    if phase is not None:
        state.phase = _PHASES[phase.lower()] if isinstance(phase, str) else phase
    if level is not None:
        state.level = level
    if stages is not None:
        del state.stage[:]
        state.stage.extend(stages)
    return state


def _rule_miss(state, rule):
    """Why ``state`` breaks ``rule`` (a short phrase), or None when it meets it."""
    if rule.HasField("phase") and rule.phase != state.phase:
        return f"phase {caffe_pb2.Phase.Name(rule.phase)} is not {caffe_pb2.Phase.Name(state.phase)}"
    if rule.HasField("min_level") and state.level < rule.min_level:
        return f"level {state.level} is below min_level {rule.min_level}"
    if rule.HasField("max_level") and state.level > rule.max_level:
        return f"level {state.level} is above max_level {rule.max_level}"
    missing = [s for s in rule.stage if s not in state.stage]
    if missing:  # the state needs every stage of the rule
        return f"stage {missing[0]!r} is not set"
    present = [s for s in rule.not_stage if s in state.stage]
    if present:  # and none of its not_stages
        return f"not_stage {present[0]!r} is set"
    return None


def state_meets_rule(net_state, rule, layer_name=""):
    """True when ``net_state`` satisfies every condition of the NetStateRule ``rule``."""
    miss = _rule_miss(net_state, rule)
    if miss is not None:
        log.debug("layer %r: rule not met: %s", layer_name, miss)
    return miss is None


def layer_included(net_state, layer):
    """Caffe's choice for one layer: include rules (any met) or exclude rules (none met)."""
    if len(layer.include) and len(layer.exclude):
        raise DefinitionError(f"layer {layer.name!r}: specify either include rules or exclude rules, not both")
    if len(layer.include):
        return any(state_meets_rule(net_state, rule, layer.name) for rule in layer.include)
    return not any(state_meets_rule(net_state, rule, layer.name) for rule in layer.exclude)


def filter_net(net_param, net_state=None):
    """A copy of ``net_param`` holding only the layers ``net_state`` includes.

    ``net_state`` defaults to ``net_param.state``; the copy's ``state`` is the one used.
    """
    state = net_param.state if net_state is None else net_state
    kept = [layer for layer in net_param.layer if layer_included(state, layer)]
    filtered = caffe_pb2.NetParameter()
    for field, value in net_param.ListFields():  # everything but the layers, copied once
        if field.name == "layer":
            continue
        if field.message_type is not None or field.is_repeated:
            getattr(filtered, field.name).MergeFrom(value)
        else:
            setattr(filtered, field.name, value)
    filtered.state.CopyFrom(state)
    filtered.layer.extend(kept)
    return filtered

