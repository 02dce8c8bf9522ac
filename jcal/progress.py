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

__all__ = ["Progress", "TqdmLoggingHandler", "capture_warnings", "step"]


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

        # on a terminal only: a log file would fill with redrawn lines
        ticker = threading.Thread(target=tick, daemon=True) if _is_terminal(bar.fp) else None
        if ticker:
            ticker.start()
        previous, self._bar = self._bar, bar
        outcome = "failed"
        try:
            yield bar.update
            outcome = "done"
        finally:
            stop.set()
            if ticker:
                ticker.join()
            self._bar = previous
            if not total or outcome == "failed":
                bar.set_postfix_str(outcome, refresh=False)
            bar.close()

    def __call__(self, stage: str, chi2: float) -> None:
        """The fits' callback: print the finished stage above the current step's line."""
        if self.enabled:
            from tqdm import tqdm
            tqdm.write(f"  {stage} done: chi2 = {chi2:.6g}", file=self.file or sys.stderr)
            if self._bar is not None:
                self._bar.set_postfix_str(stage, refresh=True)


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


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


class _Collect(logging.Handler):
    def __init__(self, into: list[str]):
        super().__init__(logging.WARNING)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record.getMessage())


@contextlib.contextmanager
def capture_warnings(into: list[str]):
    """Append the message of every warning jcal logs meanwhile to `into` (also under --quiet,
    which only hides them): a fit's outputs record what it warned about."""
    logger = logging.getLogger("jcal")
    handler = _Collect(into)
    level = logger.level
    if logger.getEffectiveLevel() > logging.WARNING:
        logger.setLevel(logging.WARNING)
    logger.addHandler(handler)
    try:
        yield into
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
