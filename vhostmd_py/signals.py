"""Which signals do what, in one place for the loop and the process around it.

STOP_SIGNALS stop the daemon in every phase of its life (upstream: SIGTERM,
SIGINT, SIGQUIT); SIGHUP reloads the configuration (ours; upstream has no
handler). Before the event loop runs, a stop signal exits at once
(exit_on_stop, so the process's finally clauses remove the pid file and
clear the disk's busy flag); while it runs, the loop's handlers take them
over (install_loop_signals); held_stop_signals defers them around a step
that must not be cut in half.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any, Callable, Dict, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
RELOAD_SIGNAL = signal.SIGHUP
# Every signal the daemon handles (a child that must outlive us ignores them).
HANDLED_SIGNALS = (*STOP_SIGNALS, RELOAD_SIGNAL)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(0)


def exit_on_stop() -> None:
    """Until the event loop takes them over: a stop signal exits (status 0) at once."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _exit_on_signal)


def install_loop_signals(
    loop: asyncio.AbstractEventLoop, stop: Callable[[], None], reload: Callable[[], None]
) -> Callable[[], None]:
    """Hand STOP_SIGNALS to STOP and SIGHUP to RELOAD on LOOP; returns the undo.

    remove_signal_handler() resets to SIG_DFL, not to what was there (the
    start-up stop handler of exit_on_stop()): the undo puts that back."""
    saved: Dict[int, Any] = {sig: signal.getsignal(sig) for sig in HANDLED_SIGNALS}
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop)
    loop.add_signal_handler(RELOAD_SIGNAL, reload)

    def restore() -> None:
        for sig, previous in saved.items():
            loop.remove_signal_handler(sig)
            if previous is not None:
                signal.signal(sig, previous)

    return restore


@contextlib.contextmanager
def held_stop_signals() -> Iterator[None]:
    """Defer the stop signals until the block is done (then they act)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
