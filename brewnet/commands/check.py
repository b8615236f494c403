"""`brewnet check` (validate a net definition) and `brewnet upgrade` (rewrite old files)."""

import contextlib
import os

import click

from brewnet import netdef
from brewnet.netdef import caffe_pb2
from brewnet.netdef.errors import DefinitionError
from brewnet.netdef.forks import fork_of_layer


@contextlib.contextmanager
def _naming(path):
    """Add ``path`` to DefinitionErrors raised without one (e.g. by filter_net)."""
    try:
        yield
    except DefinitionError as exc:
        if exc.path is not None:
            raise
        raise DefinitionError(exc.reason, path) from None


# -- loading a definition of either kind ------------------------------------------------

def _load_any(path):
    """(kind, message, was_text): a net or solver from text, or a net from binary or
    HDF5 weights; always upgraded."""
    if netdef.is_hdf5(path):
        return "net", netdef.read_weights(path), False
    data = netdef.io.read_bytes(path)
    if data and not netdef.io.looks_like_text(data):
        return "net", netdef.read_binary_net(path), False
    return (*netdef.read_net_or_solver(path), True)


# -- graph checks --------------------------------------------------------------------------

def _count_problem(cls, layer):
    """Why the layer cannot take its blob counts, or None: the layer's own declared contract
    (Caffe's CheckBlobCounts), automatic tops included. A Python layer's counts are its
    module's business, and check does not import user code."""
    if cls.type == "Python":
        return None
    instance = cls(layer)
    return instance.blob_count_problem(len(layer.bottom), instance.tops_with_auto(len(layer.top)))


def _check_layer_type(layer, path):
    """The layer's class from the registry (an unknown type is a DefinitionError)."""
    from brewnet.layers.registry import get_layer_class

    try:
        return get_layer_class(layer.type, layer.name)
    except DefinitionError as exc:
        fork = fork_of_layer(layer.type)
        if fork is not None:  # a fork's layer brewnet reads but does not run
            raise DefinitionError(f"layer {layer.name!r}: type {layer.type!r} comes from the {fork.describe()} "
                                  "fork; brewnet reads its parameters but has no implementation of it", path) from None
        raise DefinitionError(exc.reason, path) from None


def _fork_lines(layers):
    """One line per fork layer type the net uses: how many layers, and which fork it comes from."""
    counts = {}
    for layer in layers:
        if fork_of_layer(layer.type) is not None:
            counts[layer.type] = counts.get(layer.type, 0) + 1
    return [f"fork layer type {name} ({count} layer{'s' if count > 1 else ''}): from the "
            f"{fork_of_layer(name).describe()} fork (docs/FORKS.md)" for name, count in counts.items()]


def _check_blobs(index, layer, produced, path):
    """Bottoms must exist already; a top may only be re-made in place (same index as its bottom)."""
    where = f"layer {layer.name!r} (#{index}, {layer.type})"
    for blob in layer.bottom:
        if blob not in produced:
            raise DefinitionError(f"{where}: bottom {blob!r} is not produced by any earlier layer", path)
    for j, blob in enumerate(layer.top):
        in_place = j < len(layer.bottom) and layer.bottom[j] == blob
        if blob in produced and not in_place:
            raise DefinitionError(f"{where}: top {blob!r} is already produced by layer "
                                  f"{produced[blob]!r} (only in-place reuse is allowed)", path)
        produced.setdefault(blob, layer.name)


def check_net(net, path):
    """Validate a filtered net: known types, blob counts, and bottom/top wiring."""
    produced = {}
    for index, layer in enumerate(net.layer):
        cls = _check_layer_type(layer, path)
        problem = _count_problem(cls, layer)
        if problem:
            raise DefinitionError(f"layer {layer.name!r} ({layer.type}): {problem}", path)
        _check_blobs(index, layer, produced, path)
    return produced


# -- numbers ---------------------------------------------------------------------------------

def _shape(shape):
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _si(value, unit=""):
    """1234567 -> '1.23 M' (decimal prefixes, for counts and FLOPs)."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def _bytes(value):
    for factor, unit in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value} B"


# -- the report of one net state ---------------------------------------------------------------

def _table(rows):
    """Aligned lines: name, type, bottoms -> tops, output shapes, parameters, FLOPs, activations."""
    header = ("NAME", "TYPE", "BOTTOMS -> TOPS", "OUTPUT SHAPES", "PARAMS", "FLOPS", "ACTIVATIONS")
    cells = []
    for r in rows:
        bottoms, tops = " ".join(r.bottoms), " ".join(r.tops)
        arrow = f"{bottoms} -> {tops}" if bottoms else f"-> {tops}"
        if r.shapes is None:
            cells.append((r.name, r.type, arrow, "?", "?", "?", f"? ({r.note})"))
            continue
        if r.params:
            params = f"{r.params:,}" + (" + shared" if r.shared_params else "")
        else:
            params = "shared" if r.shared_params else "-"
        cells.append((r.name, r.type, arrow, ", ".join(_shape(s) for s in r.shapes), params,
                      _si(r.flops) if r.flops else "-", _bytes(r.activation_bytes) if r.activation_bytes else "-"))
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header) - 1)]

    def line(row):
        parts = [cell.rjust(w) if i in (4, 5) else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        return "  ".join(parts + [row[-1]]).rstrip()

    return [line(header)] + [line(row) for row in cells]


def _state_label(state):
    label = caffe_pb2.Phase.Name(state.phase)
    if len(state.stage):
        label += ", stage " + " + ".join(state.stage)
    if state.level:
        label += f", level {state.level}"
    return label


def _summary_lines(summary, history, training):
    """The data, totals and memory lines of a state's report."""
    lines = [f"layer '{source.layer}' reads {fact}" for source in summary.sources for fact in source.facts]
    if not any(r.shapes is not None for r in summary.rows):
        return lines + ["totals and memory: unknown (no shapes could be worked out)"]
    known = "" if summary.complete else " (of the layers whose shapes are known)"
    batch = summary.batch
    weights = summary.params * summary.itemsize
    lines.append(f"total{known}: {summary.params:,} parameters ({_bytes(weights)} of weights); forward "
                 f"{_si(summary.flops / batch if batch else 0, 'FLOPs')} per sample, "
                 f"{_si(summary.flops, 'FLOPs')} per batch of {batch}; activations "
                 f"{_bytes(summary.activation_bytes)} per batch")
    if training:
        lines.append(f"training memory at batch {batch}: about {_bytes(summary.training_bytes(history))} (weights, "
                     f"their gradients and {history} solver history blob{'s' if history > 1 else ''}: "
                     f"{_bytes(weights * (2 + history))}; activations and their gradients: "
                     f"{_bytes(2 * summary.activation_bytes)}; workspaces not counted)")
    else:
        lines.append(f"inference memory at batch {batch}: about {_bytes(summary.inference_bytes())} "
                     f"(weights {_bytes(weights)}, activations {_bytes(summary.activation_bytes)})")
    return lines


def _warnings(summary):
    found = [f"layer '{source.layer}' ({source.type}): {problem}"
             for source in summary.sources for problem in source.problems]
    found += [reason for reason in summary.unknown_reasons if "source cannot be read" not in reason]
    if not summary.complete:
        unknown = [r.name for r in summary.rows if r.shapes is None]
        found.append(f"shapes unknown for {len(unknown)} layer(s): {', '.join(unknown[:5])}"
                     f"{', ...' if len(unknown) > 5 else ''}")
    return found


def _report(title, message, state, path, history=1, training=None, extra=None):
    """(lines, warning count) of one state's report; DefinitionError when it cannot be built."""
    from brewnet.solver.summary import summarize

    with _naming(path):
        filtered = netdef.filter_net(message, state)
        blobs = check_net(filtered, path)
        summary = summarize(message, state)
    training = state.phase == caffe_pb2.TRAIN if training is None else training
    lines = ["", f"{title}: {len(filtered.layer)} of {len(message.layer)} layers", *_table(summary.rows)]
    notes = _fork_lines(filtered.layer) + _summary_lines(summary, history, training) + (extra(summary) if extra else [])
    warnings = _warnings(summary)
    lines += [f"  {line}" for line in notes + [f"warning: {w}" for w in warnings]]
    note = f" ({len(warnings)} warning{'s' if len(warnings) > 1 else ''})" if warnings else ""
    lines.append(f"{path}: OK{note}: net {filtered.name!r}, phase {_state_label(state)}, "
                 f"{len(filtered.layer)} of {len(message.layer)} layers, {len(blobs)} blobs")
    return lines, len(warnings)


# -- the states a net file declares -------------------------------------------------------------

def declared_states(net):
    """[(NetState, required)]: TRAIN and TEST, and the stages the layers' rules name. A staged
    state is required when an include rule names it with its phase (mnist_autoencoder's TEST
    stages), and the plain phase is then optional (it may have no data layer)."""
    base = net.state
    own = tuple(sorted(base.stage))
    states = []
    for phase in (caffe_pb2.TRAIN, caffe_pb2.TEST):
        staged, pinned = [], set()
        for layer in net.layer:
            rules = [(rule, True) for rule in layer.include] + [(rule, False) for rule in layer.exclude]
            for rule, including in rules:
                if rule.HasField("phase") and rule.phase != phase:
                    continue
                sets = ([tuple(rule.stage)] if len(rule.stage) else []) + [(s,) for s in rule.not_stage]
                for stages in sets:
                    key = tuple(sorted(set(own) | set(stages)))
                    if key != own and key not in staged:
                        staged.append(key)
                    if including and rule.HasField("phase") and stages == tuple(rule.stage):
                        pinned.add(key)
        states.append((netdef.make_net_state(phase, base=base), not pinned))
        states.extend((netdef.make_net_state(phase, stages=list(key), base=base), key in pinned) for key in staged)
    return states


def _layers_of(message, state):
    """The layers a state keeps, as bytes (two states that keep the same layers build the same net)."""
    try:
        return tuple(layer.SerializeToString(deterministic=True) for layer in netdef.filter_net(message, state).layer)
    except DefinitionError:
        return None


def check_net_file(message, path, states):
    """The report of each state (lines); a required state that fails is an error, an optional one
    a note. Nothing is printed before every state is checked, so an error stays one line."""
    shown = {}  # layers -> the state that showed them
    lines = []
    for state, required in states:
        names = _layers_of(message, state)
        if names is not None and names in shown:
            lines += ["", f"phase {_state_label(state)}: the same layers as phase {shown[names]}"]
            continue
        try:
            lines += _report(f"phase {_state_label(state)}", message, state, path)[0]
        except DefinitionError as exc:
            if required:
                raise
            lines += ["", f"phase {_state_label(state)}: not built ({exc.reason}); fine: this file's "
                          f"{caffe_pb2.Phase.Name(state.phase)} states name stages"]
            continue
        if names is not None:
            shown[names] = _state_label(state)
    return lines


# -- solvers ------------------------------------------------------------------------------------

def _weights_problems(param):
    """What is wrong with the solver's weights list (files or zoo:NAME), and what was found."""
    from brewnet import zoo

    facts, problems = [], []
    for spec in param.weights:
        for name in (part.strip() for part in spec.split(",") if part.strip()):
            if zoo.is_zoo_spec(name):
                try:
                    facts.append(f"weights {name}: {zoo.resolve_weights(name)} (sha1 verified)")
                except DefinitionError as exc:
                    problems.append(f"weights {name}: {exc}")
            elif os.path.isfile(name):
                facts.append(f"weights {name}")
            else:
                problems.append(f"weights file {name} not found")
    return facts, problems


def _first_counted(summary):
    return next((s for s in summary.sources if s.records and s.batch), None)


def _epochs(param):
    def lines(summary):
        source = _first_counted(summary)
        if source is None:
            return []
        per_epoch = source.records / (source.batch * max(param.iter_size, 1))
        return [f"an epoch of {source.records} samples is {per_epoch:.4g} iterations: max_iter {param.max_iter} "
                f"is {param.max_iter / per_epoch:.3g} epochs"]

    return lines


def _test_coverage(test_iter):
    def lines(summary):
        source = _first_counted(summary)
        if source is None:
            return []
        seen = test_iter * source.batch
        if seen == source.records:
            how = "every sample once"
        elif seen < source.records:
            how = f"{seen / source.records:.0%} of the {source.records} samples"
        else:
            how = f"the {source.records} samples {seen / source.records:.3g} times over"
        return [f"each test: test_iter {test_iter} x batch {source.batch} = {seen} samples: {how}"]

    return lines


def check_solver(param, path):
    """The report of a solver and of its train and test nets (lines)."""
    from brewnet.solver.solver import SOLVER_TYPES, test_net_specs, train_net_spec

    cls = SOLVER_TYPES.get(param.type)
    if cls is None:
        raise DefinitionError(f"type: unknown solver type '{param.type}' (one of {', '.join(SOLVER_TYPES)})", path)
    cls.check_param(param, path)
    train = train_net_spec(param, path)
    tests = test_net_specs(param, path)
    lines = [f"{path}: {param.type} solver, base_lr {param.base_lr:g}, lr_policy {param.lr_policy}, "
             f"max_iter {param.max_iter}" + (f", iter_size {param.iter_size}" if param.iter_size > 1 else ""),
             f"  train net: {train.source} ({train.field}), phase {_state_label(train.param.state)}"]
    for i, spec in enumerate(tests):
        lines.append(f"  test net #{i}: {spec.source} ({spec.field}), phase {_state_label(spec.param.state)}, "
                     f"test_iter {spec.test_iter}, every {param.test_interval} iterations")
    if param.snapshot or param.snapshot_after_train:
        folder = os.path.dirname(param.snapshot_prefix) or "."
        every = f"every {param.snapshot} iterations" if param.snapshot else "at the end"
        made = "" if os.path.isdir(folder) else f" (the folder {folder} is made when training starts)"
        lines.append(f"  snapshots: {param.snapshot_prefix}_iter_N.caffemodel {every}{made}")
    facts, problems = _weights_problems(param)
    lines += [f"  {line}" for line in facts + [f"warning: {p}" for p in problems]]
    report, count = _report(f"train net {train.source}, phase {_state_label(train.param.state)}", train.param,
                            train.param.state, train.source, history=cls.history_parts, extra=_epochs(param))
    lines += report
    count += len(problems)
    for i, spec in enumerate(tests):
        report, found = _report(f"test net #{i} {spec.source}, phase {_state_label(spec.param.state)}", spec.param,
                                spec.param.state, spec.source, training=False, extra=_test_coverage(spec.test_iter))
        lines += report
        count += found
    note = f" ({count} warning{'s' if count > 1 else ''})" if count else ""
    return lines + ["", f"{path}: OK{note}: {param.type} solver, a train net and {len(tests)} test net(s)"]


# -- commands -----------------------------------------------------------------------------

@click.command("check")
@click.argument("net", metavar="NET|SOLVER|zoo:NAME")
@click.option("--phase", type=click.Choice(["train", "test"], case_sensitive=False), default=None,
              help="Check this phase only (default: every state the file declares).")
@click.option("--stage", "stages", multiple=True, help="A NetState stage (repeatable).")
@click.option("--level", type=int, default=None, help="The NetState level.")
def check(net, phase, stages, level):
    """Validate a net or a solver and explain it, layer by layer.

    A net file is checked in every state it declares: TRAIN, TEST and the stages its
    rules name (or only in the state --phase/--stage/--level give). A solver is followed
    to its train and test nets, in their states. Per layer: output shapes, parameters,
    forward FLOPs and activation memory; then totals, what each data layer reads
    (sources and mean files must exist) and a memory estimate at the net's batch size.
    Shapes come from the sources' first records: no data reader is started. NET may also
    be a binary .caffemodel or zoo:NAME (the model's deploy net).
    """
    from brewnet import zoo

    heading = []
    if zoo.is_zoo_spec(net):
        model = zoo.find_model(net)
        path = zoo.resolve_model(net)
        weights = model.weights_path()
        if weights is None:
            found = f"weights not fetched yet (brewnet zoo fetch {model.key})"
        else:
            found = f"weights {weights} ({'sha1 verified' if model.sha1_ok(weights) else 'sha1 DOES NOT MATCH'})"
        heading.append(f"{net}: deploy net {path}; {found}")
        net = path
    kind, message, _ = _load_any(net)
    if kind == "solver":
        if phase or stages or level is not None:
            raise DefinitionError("--phase, --stage and --level are for net files (a solver sets its nets' states)",
                                  net)
        from brewnet.solver import read_solver_param

        lines = check_solver(read_solver_param(net), net)
    else:
        if phase or stages or level is not None:
            states = [(netdef.make_net_state(phase, level, stages or None, base=message.state), True)]
        else:
            states = declared_states(message)
        lines = [f"{net}: net {message.name!r}, {len(message.layer)} layers; states: "
                 + "; ".join(_state_label(s) + ("" if required else " (optional)") for s, required in states)]
        lines += check_net_file(message, net, states)
    for line in heading + lines:
        click.echo(line)


_TEXT_EXTENSIONS = (".prototxt", ".txt", ".pbtxt")
_BINARY_EXTENSIONS = (".caffemodel", ".binaryproto", ".pb")


def _output_format(out_path, input_was_text):
    """"text", "binary" or "hdf5", from OUT's extension (else the input's kind)."""
    lower = out_path.lower()
    if lower.endswith(".h5"):
        return "hdf5"
    if lower.endswith(_TEXT_EXTENSIONS):
        return "text"
    if lower.endswith(_BINARY_EXTENSIONS):
        return "binary"
    return "text" if input_was_text else "binary"


@click.command("upgrade")
@click.argument("input_path", metavar="IN", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="OUT", type=click.Path(dir_okay=False))
def upgrade(input_path, output_path):
    """Rewrite an old net, weights or solver file in the current format.

    OUT's extension picks the format: .prototxt/.txt text, .caffemodel/.binaryproto
    binary, .h5 HDF5 weights.
    """
    kind, message, input_was_text = _load_any(input_path)
    fmt = _output_format(output_path, input_was_text)
    if fmt == "hdf5" and kind == "solver":
        raise DefinitionError("a solver cannot be written as HDF5 weights; use .prototxt", output_path)
    if fmt == "hdf5":
        netdef.write_weights(message, output_path)
    elif fmt == "text":
        netdef.write_text(message, output_path)
    else:
        netdef.write_binary(message, output_path)
    click.echo(f"wrote {kind} {output_path} ({fmt}) from {input_path}")


COMMANDS = [check, upgrade]
