"""solver: Caffe's solvers (SGD, Nesterov, AdaGrad, RMSProp, AdaDelta, Adam)
with pycaffe's Python names.

    import brewnet
    solver = brewnet.get_solver("lenet_solver.prototxt")   # type from the file
    solver.step(100); solver.solve(); solver.snapshot(); solver.restore("x.solverstate")
    solver.net, solver.test_nets, solver.iter, solver.param
"""

from brewnet.solver.solver import (
           ACTIONS,
           NONE,
           SNAPSHOT,
           SOLVER_TYPES,
           STOP,
           AdaDeltaSolver,
           AdaGradSolver,
           AdamSolver,
           NesterovSolver,
           NetSpec,
           RMSPropSolver,
           SGDSolver,
           SignalHandler,
           Solver,
           SnapshotError,
           TrainingDivergedError,
           get_solver,
           read_solver_param,
           test_net_specs,
           train_net_spec,
)

__all__ = ["ACTIONS", "NONE", "SNAPSHOT", "SOLVER_TYPES", "STOP", "AdaDeltaSolver", "AdaGradSolver", "AdamSolver",
           "NesterovSolver", "RMSPropSolver", "SGDSolver", "SignalHandler", "SnapshotError", "Solver", "TrainingDivergedError",
           "NetSpec", "get_solver", "read_solver_param", "test_net_specs", "train_net_spec"]
