"""SIGTERM (what a cluster scheduler sends before it kills a job) and SIGINT (Ctrl-C) ask a run to stop at the next
safe point: after the current optimizer step, or at the end of the task when the signal comes during statistics,
alignment or evaluation. The trainer then writes a checkpoint and raises ``Preempted`` (docs/reliability.md)."""
from __future__ import annotations

import contextlib
import logging
import signal
import threading

import torch

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def ignore_stop_signals(worker_id: int) -> None:
    """``worker_init_fn`` of every DataLoader: Ctrl-C reaches the whole process group and a scheduler's SIGTERM
    every process of the job; a data worker that died of it would break the batch the main process still needs
    before its safe point. Workers end with the main process."""
    for number in STOP_SIGNALS:
        signal.signal(number, signal.SIG_IGN)


class StopRequest:
    """Installs the handlers for the duration of a run and remembers the first signal. A second signal stops at
    once (``KeyboardInterrupt``), for a user who does not want to wait for the step to finish."""

    def __init__(self):
        self.signal_number: int | None = None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number else ""

    def _handle(self, signal_number: int, frame) -> None:
        if self.signal_number is not None:
            raise KeyboardInterrupt
        self.signal_number = signal_number
        logging.getLogger("slca_kit").warning(f"{self.signal_name} received: stopping after the current step with a "
                                              "checkpoint (send it again to stop at once)")

    @contextlib.contextmanager
    def installed(self):
        """Handlers in place inside the block (only the main thread may set them; elsewhere signals keep their
        default meaning)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {number: signal.getsignal(number) for number in STOP_SIGNALS}
        for number in STOP_SIGNALS:
            signal.signal(number, self._handle)
        try:
            yield self
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

    def agreed(self, accelerator) -> int | None:
        """The signal number if any process was asked to stop, on every process (a max over processes, so that
        under DDP all stop at the same step even when only one received the signal); None otherwise."""
        number = self.signal_number or 0
        if accelerator.num_processes > 1:
            flag = torch.tensor([number], device=accelerator.device)
            number = int(accelerator.reduce(flag, reduction="max").item())
        return number or None
