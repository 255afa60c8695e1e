"""Stopping on SIGINT (Ctrl-C) or SIGTERM (``kill``, a cluster's time limit or preemption) without losing work.

    raise_on_sigterm()                  # the command line, at start: SIGTERM now unwinds like Ctrl-C does
    with StopRequest() as stop:         # a training loop: the first signal is a request ...
        ...; if stop.signum: save; raise Interrupted(stop.signum, "...")   # ... honoured at a step boundary

By default SIGTERM ends a Python process on the spot, so no ``finally`` runs and temporary files stay behind;
``raise_on_sigterm`` makes it raise :class:`Interrupted`, a KeyboardInterrupt, so that every clean-up runs as after
Ctrl-C (an atomic write removes its temporary file, a cache build its temporary directory). Inside
:class:`StopRequest` the first SIGINT or SIGTERM only records itself (training finishes its step and writes
last.pt); a second one raises at once. ``Interrupted.exit_code`` is the shell's 128 + signal number: 130 for SIGINT,
143 for SIGTERM.
"""
from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A signal stopped the command; ``exit_code`` = 128 + the signal number, the message says what was kept."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def raise_on_sigterm() -> None:
    """SIGTERM raises :class:`Interrupted` in the main thread from now on (as SIGINT raises KeyboardInterrupt)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise)


class StopRequest:
    """While inside, the first SIGINT/SIGTERM sets ``signum`` and tells ``announce`` (a line); a second raises
    :class:`Interrupted` at once. The previous handlers come back on exit. Outside the main thread it does nothing
    (Python delivers signals to the main thread only)."""

    def __init__(self, announce: Callable[[str], object] | None = None):
        self.announce, self.signum, self._previous = announce, 0, {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum:
            raise Interrupted(signum, f"stopped at once by a second {signal.Signals(signum).name}; the last "
                                      "checkpoint written is kept")
        self.signum = signum
        if self.announce is not None:
            self.announce(f"{signal.Signals(signum).name}: stopping after this step, which writes last.pt "
                          "(send it again to stop at once)")

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
