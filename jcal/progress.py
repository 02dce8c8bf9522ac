"""Progress on the command line: one line per step on stderr (tqdm), silent when disabled.

`Progress.step(name, total)` shows a bar when the step has a count (WCS files written) and
otherwise the elapsed time, refreshed twice a second, so a long step (reading thousands of
files, association, a fit stage) never looks stuck. A `Progress` is also the fits' per-stage
callback (`progress(stage, chi2)`): each finished stage is printed above the current line.
`step(progress, name)` accepts any callback (or None) so library code can offer steps to
whichever display its caller passes.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Callable, Iterator

__all__ = ["Progress", "TqdmLoggingHandler", "step"]


class Progress:
    """Steps shown with tqdm on `file` (default stderr); nothing at all when `enabled` is False."""

    def __init__(self, enabled: bool = True, file=None):
        self.enabled = enabled
        self.file = file
        self._bar = None

    @contextlib.contextmanager
    def step(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        """A step; yields update(n) for steps with a `total` count (a no-op otherwise)."""
        if not self.enabled:
            yield lambda n=1: None
            return
        from tqdm import tqdm

        fmt = None if total else "{desc}: {elapsed}{postfix}"
        bar = tqdm(total=total, desc=name, bar_format=fmt, file=self.file or sys.stderr, leave=True,
                   dynamic_ncols=True, unit=" files" if total else "it")
        stop = threading.Event()

        def tick():  # tqdm redraws only on update(): keep the elapsed time moving
            while not stop.wait(0.5):
                bar.refresh()

        ticker = threading.Thread(target=tick, daemon=True)
        ticker.start()
        previous, self._bar = self._bar, bar
        try:
            yield bar.update
        finally:
            stop.set()
            ticker.join()
            self._bar = previous
            if not total:
                bar.set_postfix_str("done", refresh=False)
            bar.close()

    def __call__(self, stage: str, chi2: float) -> None:
        """The fits' callback: print the finished stage above the current step's line."""
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(f"  {stage} done: chi2 = {chi2:.6g}", file=self.file or sys.stderr)
            if self._bar is not None:
                self._bar.set_postfix_str(stage, refresh=True)


def step(progress, name: str, total: int | None = None):
    """`progress.step(name, total)` where `progress` is a `Progress`, else a no-op step."""
    if isinstance(progress, Progress):
        return progress.step(name, total)
    return contextlib.nullcontext(lambda n=1: None)


class TqdmLoggingHandler(logging.StreamHandler):
    """Log records written through tqdm, so that they do not break a progress line."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)
