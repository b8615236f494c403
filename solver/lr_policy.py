"""Learning-rate policies of Caffe's SGD family (the ``lr_policy`` field).

    fixed      base_lr
    step       base_lr * gamma ^ floor(iter / stepsize)
    exp        base_lr * gamma ^ iter
    inv        base_lr * (1 + gamma * iter) ^ (-power)
    multistep  base_lr * gamma ^ (number of stepvalue entries passed)
    poly       base_lr * (1 - iter / max_iter) ^ power
    sigmoid    base_lr / (1 + exp(-gamma * (iter - stepsize)))

``current_step`` is solver state (saved in .solverstate): "step" recomputes
it from the iteration, "multistep" advances it by at most one per call, so a
resumed run continues from the saved value exactly as Caffe does.
"""

import logging
import math

from brewnet.netdef.errors import DefinitionError

log = logging.getLogger("brewnet.solver")

POLICIES = ("fixed", "step", "exp", "inv", "multistep", "poly", "sigmoid")


def check_policy(param, source=None):
    """Fail early (one line naming the solver file) on a policy Caffe would reject."""
    policy = param.lr_policy
    if not policy:
        raise DefinitionError(f"lr_policy is not set (one of {', '.join(POLICIES)})", source)
    if policy not in POLICIES:
        raise DefinitionError(f"unknown lr_policy '{policy}' (one of {', '.join(POLICIES)})", source)
    if policy in ("step", "sigmoid") and param.stepsize <= 0:
        raise DefinitionError(f"lr_policy '{policy}' needs stepsize > 0, got {param.stepsize}", source)
    if policy in ("step", "exp", "inv", "multistep", "sigmoid") and param.gamma < 0:
        raise DefinitionError(f"lr_policy '{policy}' needs gamma >= 0, got {param.gamma:g}", source)
    if policy == "poly" and param.max_iter <= 0:
        raise DefinitionError(f"lr_policy 'poly' needs max_iter > 0, got {param.max_iter}", source)


def learning_rate(param, iteration, current_step=0):
    """(rate, new current_step) at ``iteration`` for SolverParameter ``param``."""
    policy = param.lr_policy
    base = param.base_lr
    if policy == "fixed":
        rate = base
    elif policy == "step":
        current_step = iteration // param.stepsize
        rate = base * param.gamma ** current_step
    elif policy == "exp":
        rate = base * param.gamma ** iteration
    elif policy == "inv":
        rate = base * (1.0 + param.gamma * iteration) ** (-param.power)
    elif policy == "multistep":
        values = param.stepvalue
        if current_step < len(values) and iteration >= values[current_step]:
            current_step += 1
            log.info("MultiStep Status: Iteration %d, step = %d", iteration, current_step)
        rate = base * param.gamma ** current_step
    elif policy == "poly":
        remaining = 1.0 - iteration / param.max_iter
        # past max_iter a fractional power has no real value: C's pow gives NaN
        rate = base * math.pow(remaining, param.power) if remaining >= 0 or param.power.is_integer() else math.nan
    elif policy == "sigmoid":
        rate = base / (1.0 + math.exp(-param.gamma * (iteration - param.stepsize)))
    else:
        check_policy(param)
        raise AssertionError("unreachable")
    return rate, current_step
