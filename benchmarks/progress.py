"""A progress bar over the sweep: tqdm when installed, else a one-line bar of our own on stderr."""
from __future__ import annotations

import sys
import time


class _SimpleBar:
    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0
        self.start = time.perf_counter()
        self.postfix = ''
        self._draw()

    def _draw(self):
        width = 30
        done = int(width * self.n / max(self.total, 1))
        elapsed = time.perf_counter() - self.start
        sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                         f"{elapsed:6.1f}s {self.postfix[:60]:<60}")
        sys.stderr.flush()

    def set_postfix_str(self, text: str):
        self.postfix = text
        self._draw()

    def update(self, n: int = 1):
        self.n += n
        self._draw()

    def close(self):
        sys.stderr.write("\n")
        sys.stderr.flush()


def progress_bar(total: int, desc: str, enabled: bool = True):
    if not enabled:
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleBar(total, desc)
    return tqdm(total=total, desc=desc, file=sys.stderr, dynamic_ncols=True, leave=True)


class _Silent:
    def set_postfix_str(self, text):
        pass

    def update(self, n=1):
        pass

    def close(self):
        pass
