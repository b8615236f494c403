"""Training logs: `brewnet parse-log` (Caffe's tools/extra/parse_log.py) and `brewnet plot`
(the charts of Caffe's tools/extra/plot_training_log.py.example), for Caffe's logs and
brewnet's; TensorBoard scalars from a log or from a live training (tensorboardX)."""

import importlib
import logging
import os

import click

from brewnet.netdef.errors import DefinitionError

# Caffe's chart numbers (plot_training_log.py.example): y field, x field
CHARTS = (("test-accuracy", "iters"), ("test-accuracy", "seconds"), ("test-loss", "iters"),
          ("test-loss", "seconds"), ("lr", "iters"), ("lr", "seconds"), ("train-loss", "iters"),
          ("train-loss", "seconds"))
Y_TITLES = {"test-accuracy": "Test accuracy", "test-loss": "Test loss", "train-loss": "Train loss",
            "lr": "Train learning rate"}
X_TITLES = {"iters": "Iters", "seconds": "Seconds"}
IMAGE_EXTENSIONS = (".png", ".svg", ".pdf", ".jpg", ".jpeg")


def import_extra(module, extra, what):
    """``module`` imported, or a one-line error naming the extra that brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DefinitionError(f"{what} needs {module.split('.')[0]}: pip install 'brewnet[{extra}]'") from None


def _parse(path):
    from brewnet.solver import logparse

    if not os.path.isfile(path):
        raise DefinitionError("log file not found", path)
    return logparse.parse_log(path)


# -- parse-log ------------------------------------------------------------------------------

@click.command("parse_log")
@click.argument("logfile_path", type=click.Path(dir_okay=False))
@click.argument("output_dir", type=click.Path(file_okay=False))
@click.option("--verbose", is_flag=True, help="Say which files were written.")
@click.option("--delimiter", default=",", show_default=True, help="Column delimiter of the output files.")
def parse_log_cmd(logfile_path, output_dir, verbose, delimiter):
    """A training log -> OUTPUT_DIR/<log name>.train and .test tables (CSV).

    As Caffe's tools/extra/parse_log.py: one row per iteration that printed net outputs,
    columns NumIters, Seconds (since "Solving"), LearningRate and every output. Reads
    Caffe's logs (both glog prefixes, with and without the year) and brewnet's.
    LearningRate is the rate of the row's own iteration; outputs of test net #1, #2 ...
    are columns NAME#1, ...
    """
    from brewnet.solver import logparse

    if len(delimiter) != 1:
        raise DefinitionError(f"--delimiter must be one character, got {delimiter!r}")
    parsed = _parse(logfile_path)
    os.makedirs(output_dir, exist_ok=True)
    written = logparse.save_csv_files(logfile_path, output_dir, parsed, delimiter)
    if verbose or not written:
        for path in written:
            click.echo(f"Wrote {path}")
        for kind, rows in (("train", parsed.train), ("test", parsed.test)):
            if not rows:
                click.echo(f"Not writing the {kind} table: no {kind} net outputs in {logfile_path}")


# -- plot -----------------------------------------------------------------------------------

def _log_label(path, all_paths):
    name = os.path.basename(path)
    stem, ext = os.path.splitext(name)
    label = stem if ext.lower() in (".log", ".txt", ".info") else name
    others = [os.path.basename(p) for p in all_paths if p != path]
    return path if name in others else label


def _pick_column(rows, wanted, path, kind):
    """The column a chart plots: the named one, or the first whose name says accuracy/loss."""
    from brewnet.solver.logparse import FIXED_COLUMNS, columns

    names = [n for n in columns(rows) if n not in FIXED_COLUMNS]
    if wanted in names:
        return wanted
    keys = {"accuracy": ("accuracy", "acc"), "loss": ("loss",)}.get(wanted)
    if keys:
        for key in keys:
            match = next((n for n in names if key in n.lower() and "#" not in n), None)
            if match:
                return match
    have = ", ".join(names) or "none"
    raise DefinitionError(f"no {kind} output {wanted!r} in this log ({kind} outputs: {have}); "
                          f"choose one with --field", path)


def chart_series(parsed, y, x, path, field=None):
    """(xs, ys) of one log for a chart."""
    x_index = 0 if x == "iters" else 1
    if field is not None:
        for kind, rows in (("test", parsed.test), ("train", parsed.train)):
            if any(field in row for row in rows):
                return _column_series(rows, field, x_index)
        _pick_column(parsed.test + parsed.train, field, path, "net")
    if y == "train-loss":
        if parsed.display_loss:
            return [p[x_index] for p in parsed.display_loss], [p[2] for p in parsed.display_loss]
        return _column_series(parsed.train, _pick_column(parsed.train, "loss", path, "train"), x_index)
    if y == "lr":
        rows = [r for r in parsed.train if r["LearningRate"] == r["LearningRate"]]
        if not rows:
            raise DefinitionError("no learning rates (\"Iteration N, lr = ...\" lines) in this log", path)
        return [_x(r, x_index) for r in rows], [r["LearningRate"] for r in rows]
    wanted = "accuracy" if y == "test-accuracy" else "loss"
    if not parsed.test:
        raise DefinitionError("no test net outputs in this log", path)
    return _column_series(parsed.test, _pick_column(parsed.test, wanted, path, "test"), x_index)


def _x(row, x_index):
    return row["NumIters"] if x_index == 0 else row["Seconds"]


def _column_series(rows, name, x_index):
    rows = [r for r in rows if name in r]
    return [_x(r, x_index) for r in rows], [r[name] for r in rows]


def _split_arguments(args):
    """(chart number or None, output, logs) from LOG... OUT or Caffe's CHART OUT LOG..."""
    if len(args) >= 3 and args[0].isdigit() and not os.path.exists(args[0]):
        return int(args[0]), args[1], list(args[2:])
    if len(args) < 2:
        raise DefinitionError("give one or more logs and the image to write: brewnet plot LOG... OUT.png")
    return None, args[-1], list(args[:-1])


def write_plot(series, y_title, x_title, output, title=None):
    """Draw [(label, xs, ys)] as lines on one chart and save it (format from the extension)."""
    matplotlib = import_extra("matplotlib", "plot", "brewnet plot")
    matplotlib.use("Agg", force=True)
    pyplot = importlib.import_module("matplotlib.pyplot")
    figure, axes = pyplot.subplots(figsize=(8, 5), dpi=100)
    try:
        for label, xs, ys in series:
            axes.plot(xs, ys, label=label, linewidth=1.2, marker="o" if len(xs) <= 40 else None, markersize=3)
        axes.set_xlabel(x_title)
        axes.set_ylabel(y_title)
        axes.set_title(title or f"{y_title} vs. {x_title}")
        axes.grid(True, alpha=0.3)
        if y_title.endswith("learning rate"):
            axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        loc = "lower right" if "accuracy" in y_title.lower() else "upper right"
        axes.legend(loc=loc)
        figure.tight_layout()
        from brewnet.netdef import atomic_write

        ext = os.path.splitext(output)[1].lower().lstrip(".") or "png"
        with atomic_write(output, "wb") as f:
            figure.savefig(f, format=ext)
    finally:
        pyplot.close(figure)


@click.command("plot")
@click.argument("args", nargs=-1, required=True, metavar="LOG... OUT.png")
@click.option("--chart", type=click.IntRange(0, len(CHARTS) - 1), default=None,
              help="Caffe's chart number: " + ", ".join(
                  f"{i}: {Y_TITLES[y]} vs. {X_TITLES[x]}" for i, (y, x) in enumerate(CHARTS)) + ".")
@click.option("--y", "y_field", type=click.Choice(sorted(Y_TITLES)), default=None,
              help="What to draw (default test-accuracy): the first test output named *accuracy*/*acc*, the "
                   "first named *loss*, the train loss of the display lines (smoothed over average_loss), "
                   "or the learning rate.")
@click.option("--x", "x_field", type=click.Choice(sorted(X_TITLES)), default=None,
              help="Iterations (default) or seconds since the solver started.")
@click.option("--field", default=None, metavar="NAME", help="Draw this net output instead (test or train, "
                                                             "e.g. accuracy_top5, loss#1).")
@click.option("--title", default=None, help="Chart title.")
@click.option("--tensorboard", "tensorboard_dir", type=click.Path(file_okay=False), default=None,
              help="Also write every value of each log as TensorBoard scalars under this folder (one run per log; "
                   "needs tensorboardX).")
def plot(args, chart, y_field, x_field, field, title, tensorboard_dir):
    """Draw one quantity of one or more training logs on one chart.

    brewnet plot LOG... OUT.png, or Caffe's order: brewnet plot CHART OUT.png LOG...
    The chart types are those of Caffe's plot_training_log.py: test accuracy, test loss,
    train loss or learning rate, against iterations or seconds. OUT's extension picks
    the format (.png, .svg, .pdf). Needs matplotlib (pip install 'brewnet[plot]').
    """
    number, output, logs = _split_arguments(list(args))
    chart = number if number is not None else chart
    if not output.lower().endswith(IMAGE_EXTENSIONS):
        raise DefinitionError(f"the last argument must be the image to write ({', '.join(IMAGE_EXTENSIONS)}); "
                              f"got {output}")
    y, x = CHARTS[chart] if chart is not None else ("test-accuracy", "iters")
    y, x = y_field or y, x_field or x
    import_extra("matplotlib", "plot", "brewnet plot")
    if tensorboard_dir:
        import_extra("tensorboardX", "tensorboard", "--tensorboard")
    parsed_logs = [(path, _parse(path)) for path in logs]
    series = []
    for path, parsed in parsed_logs:
        xs, ys = chart_series(parsed, y, x, path, field)
        series.append((_log_label(path, logs), xs, ys))
    y_title = field if field is not None else Y_TITLES[y]
    write_plot(series, y_title, X_TITLES[x], output, title)
    click.echo(f"Wrote {output}: {y_title} vs. {X_TITLES[x]} of {len(logs)} log(s)")
    if tensorboard_dir:
        for path, parsed in parsed_logs:
            run = os.path.join(tensorboard_dir, _log_label(path, logs).replace(os.sep, "_"))
            count = export_tensorboard(parsed, run)
            click.echo(f"Wrote {count} scalars of {path} to {run}")


# -- TensorBoard ----------------------------------------------------------------------------

def scalar_tag(kind, name):
    """TensorBoard's tag for a value the log parser reports."""
    if kind == "lr":
        return "learning_rate"
    if kind == "loss":
        return "train/smoothed_loss"
    return f"{kind}/{name}"


class TensorBoardScalars:
    """Scalars into a TensorBoard event folder (tensorboardX)."""

    def __init__(self, logdir, flush_secs=10):
        writer = import_extra("tensorboardX", "tensorboard", "--tensorboard")
        os.makedirs(logdir, exist_ok=True)
        self.writer = writer.SummaryWriter(logdir=logdir, flush_secs=flush_secs)
        self.count = 0

    def scalar(self, kind, name, iteration, value, seconds=None, walltime=None):
        self.writer.add_scalar(scalar_tag(kind, name), value, global_step=iteration, walltime=walltime)
        self.count += 1

    def close(self):
        self.writer.close()


def export_tensorboard(parsed, logdir):
    """Every value of a parsed log as scalars; returns how many."""
    board = TensorBoardScalars(logdir)
    try:
        for kind, rows in (("train", parsed.train), ("test", parsed.test)):
            for row in rows:
                for name, value in row.items():
                    if name not in ("NumIters", "Seconds", "LearningRate"):
                        board.scalar(kind, name, row["NumIters"], value)
        seen = set()
        for row in parsed.train:
            if row["LearningRate"] == row["LearningRate"] and row["NumIters"] not in seen:
                seen.add(row["NumIters"])
                board.scalar("lr", "lr", row["NumIters"], row["LearningRate"])
        for iteration, _, value in parsed.display_loss:
            board.scalar("loss", "loss", iteration, value)
    finally:
        board.close()
    return board.count


class LiveScalars(logging.Handler):
    """A logging handler that reads a training's own log lines as they are written and sends
    every value to TensorBoard (``brewnet train --tensorboard DIR``)."""

    def __init__(self, logdir):
        from brewnet.solver.log import GlogFormatter
        from brewnet.solver.logparse import LogParser

        super().__init__()
        self.board = TensorBoardScalars(logdir)
        self.setFormatter(GlogFormatter())
        self.parser = LogParser(on_scalar=self._scalar)

    def _scalar(self, kind, name, iteration, value, seconds):
        self.board.scalar(kind, name, iteration, value)

    def emit(self, record):
        try:
            self.parser.feed(self.format(record))
        except Exception:  # a broken event file must not stop the training
            self.handleError(record)

    def close(self):
        self.board.close()
        super().close()


COMMANDS = [parse_log_cmd, plot]
