"""Timing as in lsst.utils.timer: `logInfo`, the `timeMethod` decorator and `Task.timer`.

For an item name ``N`` (a method name or a ``timer`` block), the task metadata gets
``NStartUtc``/``NEndUtc`` (ISO UTC), ``NStartWallTime``/``NEndWallTime`` (epoch seconds),
``NStartCpuTime``/``NEndCpuTime``, ``NStartUserTime``/``NEndUserTime``,
``NStartSystemTime``/``NEndSystemTime`` (seconds of process CPU) and
``NStartMaxResidentSetSize``/``NEndMaxResidentSetSize`` (bytes, peak RSS from getrusage).
"""

from __future__ import annotations

import datetime
import functools
import logging
import resource
import sys
import time

__all__ = ["logInfo", "timeMethod", "timing_table"]


def _maxrss_bytes(ru) -> int:
    return int(ru.ru_maxrss) * (1 if sys.platform == "darwin" else 1024)  # Linux: kB


def logInfo(obj, prefix: str, logLevel: int = logging.DEBUG, metadata=None, logger=None) -> None:
    """Record the current times and peak memory under ``prefix`` in the metadata, and log them."""
    metadata = metadata if metadata is not None else obj.metadata
    logger = logger or getattr(obj, "log", logging.getLogger("jcal"))
    ru = resource.getrusage(resource.RUSAGE_SELF)
    values = {
        "Utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "WallTime": time.time(),
        "CpuTime": time.process_time(),
        "UserTime": ru.ru_utime,
        "SystemTime": ru.ru_stime,
        "MaxResidentSetSize": _maxrss_bytes(ru),
    }
    for k, v in values.items():
        metadata[prefix + k] = v
    logger.log(logLevel, "%s: cpu=%.3fs maxRSS=%.1f MB", prefix, values["CpuTime"],
               values["MaxResidentSetSize"] / 2**20)


def timeMethod(func=None, *, logLevel: int = logging.DEBUG):
    """Decorator: record start/end times of a Task method in its metadata (item = method name)."""
    def wrap(f):
        @functools.wraps(f)
        def wrapper(self, *args, **kwargs):
            logInfo(self, f.__name__ + "Start", logLevel)
            try:
                return f(self, *args, **kwargs)
            finally:
                logInfo(self, f.__name__ + "End", logLevel)
        return wrapper
    return wrap(func) if func is not None else wrap


def timing_table(full_metadata) -> list[tuple[str, float, float, float]]:
    """(task:item, wall s, cpu s, peak RSS MB) for every timed item in a full-metadata object."""
    rows = []
    for task_name, md in full_metadata.items():
        for key in md.names():
            if key.endswith("StartWallTime"):
                item = key[: -len("StartWallTime")]
                if item + "EndWallTime" in md:
                    rows.append((f"{task_name}.{item}", md[item + "EndWallTime"] - md[key],
                                 md[item + "EndCpuTime"] - md[item + "StartCpuTime"],
                                 md[item + "EndMaxResidentSetSize"] / 2**20))
    return rows
