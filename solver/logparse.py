"""Reading training logs: Caffe's and brewnet's (the same glog lines).

The tables are those of Caffe's tools/extra/parse_log.py: one row per iteration
that printed net outputs, with NumIters, Seconds (since the "Solving" line),
LearningRate and one column per output, for the train net and for the test
nets. Beyond it:

- glog's two line prefixes are read: ``I0210 13:39:22.381027`` (the year from
  the file's time, rolled over when the month goes back, as parse_log.py does)
  and ``I20261204 14:38:01.180390`` (glog 0.7 and later write the year);
- LearningRate is the rate of the row's own iteration (the "Iteration N, lr ="
  line comes after that iteration's outputs; parse_log.py gives a row the rate
  of the display before it);
- a row is kept even when it is the log's last or only one;
- outputs of test net #1, #2, ... get their own columns, ``NAME#1`` and so on
  (parse_log.py writes them over test net #0's);
- the smoothed loss of the display lines (``Iteration N (...), loss = X``,
  what Caffe's plot_training_log.py draws as the training loss) is kept too.

The parser is incremental (``feed`` one line at a time), so a live training
can drive it through a logging handler (``brewnet train --tensorboard``).
"""

import collections
import csv
import datetime
import os
import re

_PREFIX = re.compile(r"^[IWEF](\d{4})?(\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d{6}) ")
_ITERATION = re.compile(r"Iteration (\d+)")
_NUMBER = r"([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|[-+]?nan|[-+]?inf)"
_OUTPUT = re.compile(r"(Train|Test) net output #(\d+): (\S+) = " + _NUMBER)
_LR = re.compile(r"Iteration (\d+), lr = " + _NUMBER)
_DISPLAY_LOSS = re.compile(r"Iteration (\d+)(?: \([^)]*\))?, loss = " + _NUMBER)
_TESTING = re.compile(r"Iteration (\d+), Testing net \(#(\d+)\)")

FIXED_COLUMNS = ("NumIters", "Seconds", "LearningRate")


def line_time(line, year):
    """The datetime of a glog line, or None when the line has no glog prefix."""
    match = _PREFIX.match(line)
    if match is None:
        return None
    stated_year, month, day, hour, minute, second, micro = match.groups()
    try:
        return datetime.datetime(int(stated_year or year), int(month), int(day), int(hour), int(minute),
                                 int(second), int(micro))
    except ValueError:
        return None


class LogParser:
    """Feed it a log's lines; it fills ``train`` and ``test`` (lists of row dicts)
    and ``display_loss`` ((iteration, seconds, smoothed loss) tuples).

    ``on_scalar(kind, name, iteration, value, seconds)`` (optional) hears every
    value as soon as it is read: kind "train"/"test" for net outputs, "lr", and
    "loss" for the display lines' smoothed loss.
    """

    def __init__(self, year=None, on_scalar=None):
        self.year = year if year is not None else datetime.date.today().year
        self.on_scalar = on_scalar
        self.train, self.test, self.display_loss = [], [], []
        self.iteration = None
        self.start = None
        self._last = None
        self._test_net = 0
        self._lr = float("nan")  # the last rate read
        self._rows = {"Train": None, "Test": None}

    # -- reading ---------------------------------------------------------------
    def _time(self, line):
        when = line_time(line, self.year)
        if when is None:
            return None
        if self._last is not None and when.month < self._last.month and not _PREFIX.match(line).group(1):
            self.year += 1  # a year-less log that ran past new year's eve
            when = when.replace(year=self.year)
        self._last = when
        return when

    def feed(self, line):
        when = self._time(line)
        if when is None:
            return  # not a glog line (a solver dump, a shell prompt, a traceback)
        if self.start is None and "Solving" in line:
            self.start = when
        match = _ITERATION.search(line)
        if match:
            self.iteration = int(match.group(1))
        if self.iteration is None:
            return  # nothing before the first iteration is a table entry
        seconds = (when - (self.start or when)).total_seconds()
        testing = _TESTING.search(line)
        if testing:
            self._test_net = int(testing.group(2))
            return
        match = _OUTPUT.search(line)
        if match:
            self._output(match.group(1), match.group(3), float(match.group(4)), seconds)
            return
        match = _LR.search(line)
        if match:
            self._learning_rate(int(match.group(1)), float(match.group(2)), seconds)
            return
        match = _DISPLAY_LOSS.search(line)
        if match:
            iteration, value = int(match.group(1)), float(match.group(2))
            self.display_loss.append((iteration, seconds, value))
            self._tell("loss", "loss", iteration, value, seconds)

    def _tell(self, kind, name, iteration, value, seconds):
        if self.on_scalar is not None:
            self.on_scalar(kind, name, iteration, value, seconds)

    def _output(self, kind, name, value, seconds):
        rows = self.train if kind == "Train" else self.test
        row = self._rows[kind]
        if row is None or row["NumIters"] != self.iteration:
            # the last rate read, until this iteration's own "lr =" line (if it has one) comes
            row = collections.OrderedDict(NumIters=self.iteration, Seconds=seconds, LearningRate=self._lr)
            rows.append(row)
            self._rows[kind] = row
        if kind == "Test" and self._test_net:
            name = f"{name}#{self._test_net}"
        row[name] = value
        self._tell(kind.lower(), name, self.iteration, value, seconds)

    def _learning_rate(self, iteration, value, seconds):
        self._lr = value
        for rows in (self.train, self.test):
            for row in reversed(rows):
                if row["NumIters"] != iteration:
                    break
                row["LearningRate"] = value
        self._tell("lr", "lr", iteration, value, seconds)

    def finish(self):
        """Rows written before the first "lr =" line take the first rate seen (parse_log.py's fix)."""
        for rows in (self.train, self.test):
            known = [row["LearningRate"] for row in rows if row["LearningRate"] == row["LearningRate"]]
            for row in rows:
                if row["LearningRate"] != row["LearningRate"] and known:
                    row["LearningRate"] = known[0]
        return self


def log_year(path):
    """The year a year-less log was written in, from the file's time (as parse_log.py)."""
    return datetime.datetime.fromtimestamp(os.path.getctime(path)).year


def parse_log(path):
    """A LogParser that has read the whole file ``path``."""
    path = os.fspath(path)
    parser = LogParser(year=log_year(path))
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            parser.feed(line.rstrip("\n"))
    return parser.finish()


def columns(rows):
    """NumIters, Seconds, LearningRate, then every output in order of appearance."""
    names = list(FIXED_COLUMNS)
    for row in rows:
        names.extend(name for name in row if name not in names)
    return names


def write_csv(path, rows, delimiter=","):
    """One table as parse_log.py writes it (nothing when there are no rows); True when written."""
    if not rows:
        return False
    from brewnet.netdef import atomic_write

    names = columns(rows)
    with atomic_write(path, "w") as f:
        writer = csv.DictWriter(f, fieldnames=names, delimiter=delimiter, lineterminator="\r\n", restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return True


def save_csv_files(log_path, output_dir, parsed, delimiter=","):
    """OUTDIR/<log name>.train and .test; returns the paths written."""
    base = os.path.join(os.fspath(output_dir), os.path.basename(os.fspath(log_path)))
    written = []
    for suffix, rows in ((".train", parsed.train), (".test", parsed.test)):
        if write_csv(base + suffix, rows, delimiter):
            written.append(base + suffix)
    return written
