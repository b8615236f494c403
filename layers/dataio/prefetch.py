"""A loader thread that keeps a queue of ready batches (Caffe's prefetch), holding no layer."""

import queue
import threading


class Prefetcher:
    """A daemon thread filling a queue with ``load()`` results (or the exception it raised)."""

    def __init__(self, load, depth):
        self.queue = queue.Queue(maxsize=max(1, depth))
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(load, self.queue, self.stop), daemon=True)
        self.thread.start()

    @staticmethod
    def _run(load, q, stop):
        while not stop.is_set():
            try:
                item = load()
            except BaseException as exc:  # handed to forward, which raises it
                item = exc
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.2)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return

    def get(self):
        item = self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self):
        self.stop.set()

    def join(self):
        """Stop and wait for the thread (it finishes the batch it is loading)."""
        self.close()
        self.thread.join()
