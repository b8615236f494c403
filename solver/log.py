"""Caffe-style log output: glog line prefixes (so Caffe's tools/extra/parse_log.py
and friends read brewnet logs) and a live progress line on terminals.

A glog line looks like ``I0210 13:39:22.381027 25210 solver.py:204] Iteration 100, lr = 0.01``:
severity letter, month+day, time with microseconds, thread/process id, source.
"""

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


class Progress:
    """A one-line ``iter N/M  X it/s  ETA h:mm:ss`` indicator, redrawn in place.

    Drawn only when the stream is a terminal, so log files and pipes get the
    plain Caffe lines alone. The log handler erases it before each record.
    """

    def __init__(self, stream=None, min_interval=0.2):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.min_interval = min_interval
        self._shown = ""
        self._last_draw = 0.0
        self._start = None

    def start(self, iteration, total):
        self._start = (time.monotonic(), iteration)
        self.total = total

    def update(self, iteration):
        if not self.enabled or self._start is None:
            return
        now = time.monotonic()
        if now - self._last_draw < self.min_interval and iteration < self.total:
            return
        self._last_draw = now
        t0, i0 = self._start
        rate = (iteration - i0) / max(now - t0, 1e-9)
        left = self.total - iteration
        eta = "--:--:--" if rate <= 0 else str(datetime.timedelta(seconds=int(left / rate)))
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
        self._start = None


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
