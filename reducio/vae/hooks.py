"""Progress and interruption hooks for long encode/decode runs (no UI framework imported here)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

ProgressFn = Callable[[int, int], None]
InterruptFn = Callable[[], Optional[bool]]


class ReducioInterrupted(RuntimeError):
    """Raised when the interrupt hook asks to stop (returned True)."""


@dataclass
class StepHooks:
    """Calls ``interrupt()`` before each unit of work and ``progress(done, total)`` after it.

    ``interrupt`` may raise its own exception (ComfyUI's ``throw_exception_if_processing_interrupted``
    does) or return True, in which case :class:`ReducioInterrupted` is raised. Nothing is returned
    half-done: outputs are only assembled once every unit has finished.
    """

    total: int
    progress: Optional[ProgressFn] = None
    interrupt: Optional[InterruptFn] = None
    done: int = 0

    def check(self) -> None:
        if self.interrupt is not None and self.interrupt():
            raise ReducioInterrupted("Reducio VAE run interrupted")

    def advance(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total)
