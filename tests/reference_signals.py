"""A callback for tests: a signal to this process in the middle of the reference pass."""

import os
import signal

import lightning as L


class SignalInReferencePass(L.Callback):
    """Sends `signum` to this process when the reference pass has computed `batches` batches (callbacks' on_fit_start
    runs before the module's, which holds the pass)."""

    def __init__(self, batches: int = 2, signum: int = int(signal.SIGTERM)):
        self.batches, self.signum = batches, signum

    def on_fit_start(self, trainer, pl_module) -> None:
        original, calls = pl_module.reference.score, []

        def counting(*args, **kwargs):
            result = original(*args, **kwargs)
            calls.append(1)
            if len(calls) == self.batches:
                os.kill(os.getpid(), self.signum)
            return result

        pl_module.reference.score = counting
