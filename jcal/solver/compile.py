"""`brief_jit`: `jax.jit` for programs that run a few times, briefly, and mostly cost compilation.

XLA's CPU compiler has two ways to emit fused loops. On this machine (jaxlib 0.10.2), the older
emitters compile jcal's programs ~35 % faster. Their code runs as fast for the cheap programs
(whitening, leave-one-out scoring, mapping-only and stars-only steps, model evaluation), but
up to 25 % slower for the costly ones (full linearisation, joint step). So only the cheap
programs use them (benchmarks/bench.py, medium: ~1.5 s less compilation per fit, run time
unchanged).

The option is probed once, on the first call: a jaxlib that does not know it, or a GPU,
gets XLA's defaults. Nothing changes but compilation speed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np

_OLDER_EMITTERS = {"xla_cpu_use_fusion_emitters": False}


@functools.cache
def _compiler_options() -> dict:
    if jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=_OLDER_EMITTERS).lower(np.zeros(1)).compile()
    except Exception:  # an XLA that does not know the option rejects it (INVALID_ARGUMENT)
        return {}
    return _OLDER_EMITTERS


class brief_jit:
    """Like `jax.jit(fun, **kwargs)`, compiled for compile speed (see the module docstring).

    The jitted function is built on the first call, so importing jcal touches no backend."""

    def __init__(self, fun: Callable, **jit_kwargs):
        self._fun, self._jit_kwargs, self._jitted = fun, jit_kwargs, None
        functools.update_wrapper(self, fun)

    def __call__(self, *args, **kwargs):
        if self._jitted is None:
            self._jitted = jax.jit(self._fun, compiler_options=_compiler_options(), **self._jit_kwargs)
        return self._jitted(*args, **kwargs)


# JAX's monitoring events for the three parts of making a program (the backend part includes
# fetching it from the persistent cache); see `CompileClock`.
_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
           "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
           "/jax/core/compile/backend_compile_duration": "compile"}
_TOTALS = dict.fromkeys(_EVENTS.values(), 0.0)


@functools.cache
def _listen() -> None:
    def on_duration(event: str, duration: float, **_):
        key = _EVENTS.get(event)
        if key is not None:
            _TOTALS[key] += duration

    jax.monitoring.register_event_duration_secs_listener(on_duration)


class CompileClock:
    """Seconds this process spends making programs (tracing, lowering, compiling or fetching from the
    persistent cache) from its creation to `seconds()`: what a fit pays before it computes."""

    def __init__(self):
        _listen()
        self._start = sum(_TOTALS.values())

    def seconds(self) -> float:
        return sum(_TOTALS.values()) - self._start
