"""Caffe-style log output: glog line prefixes (so Caffe's tools/extra/parse_log.py
and friends read brewnet logs) and a live progress line on terminals.

A glog line looks like ``I0210 13:39:22.381027 25210 solver.py:204] Iteration 100, lr = 0.01``:
severity letter, month+day, time with microseconds, thread/process id, source.
"""

import collections
import contextlib
import datetime
import logging
import os
import sys
import time

LOGGER_NAME = "brewnet"


def fmt(value):
    """A number the way C++ ostreams print floats by default (6 significant digits)."""
    return format(float(value), ".6g")


class GlogFormatter(logging.Formatter):
    def format(self, record):
        stamp = datetime.datetime.fromtimestamp(record.created)
        prefix = (f"{record.levelname[:1]}{stamp:%m%d %H:%M:%S}.{stamp.microsecond:06d} "
                  f"{os.getpid()} {record.filename}:{record.lineno}]")
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        return f"{prefix} {message}"


def format_eta(seconds):
    """h:mm:ss, or --:--:-- when unknown."""
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "--:--:--"
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class RecentRate:
    """Iterations per second over the last ``window`` seconds of (time, iteration) samples,
    so start-up (compiling kernels, the first test) fades out of the rate and the ETA."""

    def __init__(self, window=30.0):
        self.window = window
        self._samples = collections.deque()

    def add(self, iteration, now=None):
        now = time.monotonic() if now is None else now
        self._samples.append((now, iteration))
        # keep one sample older than the window, so the rate spans the whole window
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self):
        """Iterations per second, or None with fewer than two samples."""
        if len(self._samples) < 2:
            return None
        (t0, i0), (t1, i1) = self._samples[0], self._samples[-1]
        return (i1 - i0) / (t1 - t0) if t1 > t0 else None

    def eta(self, remaining):
        """Seconds to do ``remaining`` iterations at the recent rate (None when unknown)."""
        rate = self.rate()
        return remaining / rate if rate else None


class Progress:
    """A one-line ``iter N/M  X it/s  ETA h:mm:ss`` indicator, redrawn in place; the rate
    and ETA are over the last 30 seconds.

    Drawn only when the stream is a terminal, so log files and pipes get the
    plain Caffe lines alone. The log handler erases it before each record.
    """

    def __init__(self, stream=None, min_interval=0.2, window=30.0):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval
        self.window = window
        self._shown = ""
        self._last_draw = 0.0
        self._rate = None

    def start(self, iteration, total):
        self._rate = RecentRate(self.window)
        self._rate.add(iteration)
        self.total = total

    def update(self, iteration):
        if not self.enabled or self._rate is None:
            return
        now = time.monotonic()
        self._rate.add(iteration, now)
        if now - self._last_draw < self.min_interval and iteration < self.total:
            return
        self._last_draw = now
        rate = self._rate.rate() or 0.0
        eta = format_eta(self._rate.eta(self.total - iteration))
        self._draw(f"iter {iteration}/{self.total}  {rate:.2f} it/s  ETA {eta}")

    def _draw(self, text):
        self.stream.write("\r\033[K" + text)
        self.stream.flush()
        self._shown = text

    def clear(self):
        if self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def redraw(self):
        if self._shown:
            self.stream.write(self._shown)
            self.stream.flush()

    def close(self):
        self.clear()
        self._shown = ""
        self._rate = None


class GlogHandler(logging.StreamHandler):
    """StreamHandler that keeps the progress line below the log lines."""

    def __init__(self, stream=None):
        super().__init__(stream if stream is not None else sys.stderr)
        self.setFormatter(GlogFormatter())
        self.progress = None

    def emit(self, record):
        progress = self.progress
        if progress is not None and progress.stream is self.stream:
            progress.clear()
            super().emit(record)
            progress.redraw()
        else:
            super().emit(record)


def setup_logging(level=logging.INFO, stream=None):
    """Send brewnet's log records to stderr in glog format (idempotent); returns the handler."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in logger.handlers:
        if isinstance(handler, GlogHandler):
            if stream is not None:
                handler.setStream(stream)
            logger.setLevel(level)
            return handler
    handler = GlogHandler(stream)
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    return handler


def add_log_file(path, level=logging.INFO):
    """Also write brewnet's log records to the file ``path`` (appended), in the same glog
    lines as on the console; returns the handler (remove it with ``remove_log_file``)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handler = logging.FileHandler(path, mode="a", encoding="utf-8")
    handler.setFormatter(GlogFormatter())
    handler.setLevel(level)
    logger = logging.getLogger(LOGGER_NAME)
    logger.addHandler(handler)
    if logger.level == logging.NOTSET or logger.level > level:
        logger.setLevel(level)
    return handler


def remove_log_file(handler):
    logging.getLogger(LOGGER_NAME).removeHandler(handler)
    handler.close()


def default_log_path(snapshot_prefix, when=None):
    """Where a training writes its log without --log: beside its snapshots, named after the
    prefix, the start time and the process (as glog names caffe.INFO's targets)."""
    when = when or datetime.datetime.now()
    return f"{snapshot_prefix}.{when:%Y%m%d-%H%M%S}.{os.getpid()}.log"


def link_latest_log(path, link):
    """Point ``link`` (PREFIX.INFO, as glog's caffe.INFO) at the newest log; best effort."""
    try:
        tmp = f"{link}.{os.getpid()}.tmp"
        os.symlink(os.path.basename(path), tmp)
        os.replace(tmp, link)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
