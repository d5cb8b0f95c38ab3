"""What a run needs to stop and continue exactly: the global RNG states, and the stop signals.

A training state (``opr.checkpoint.save_train_state``: weights, optimizer, data position, results so far, the
``info`` marker) is written by the loop at stage ends and, through the trainer's step hook, mid-stage
(:meth:`opr.loop.ContinualLoop._save_train_state`); a resumed run restores it and, last, the RNG state
(:func:`set_rng_state`), so nothing between the saved point and the restore draws a random number.
:class:`GracefulStop` turns SIGTERM, Ctrl-C and the SLURM pre-emption signal into "save a state, then stop".
"""

from __future__ import annotations

import logging
import os
import random
import signal
import threading
from typing import Optional

import numpy as np
import torch

log = logging.getLogger("opr")


def info_kind(saved: dict) -> str:
    return saved["info"]["kind"]


def rng_state() -> dict:
    """The global RNG states of python, numpy and torch (CPU and, if present, CUDA)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class GracefulStop:
    """Turns SIGTERM, Ctrl-C (SIGINT) and the SLURM/submitit pre-emption signal into "save a training state,
    then stop".

    The handler only records the signal; the loop acts on it at the next safe point (after an optimizer step
    or at a stage end): it saves a training state (mid-stage wherever the step has a resumable position: SFT
    and on-policy stages; elsewhere it stops at once and the stage reruns from its start), then hands over to
    the handler that was installed before
    (for submitit's ``SIGUSR2``: requeue the job and exit) or exits with status 128 + signal.

    A safe point may be far (a 7B evaluation, rollouts or a save between two steps can outlast SLURM's warning
    before the kill, and a job killed before it requeues is never requeued): ``grace_s`` seconds after the
    signal, if no safe point has been reached, the signal is delivered again, and a second signal of the same
    kind leaves at once through the previous handler (requeue) without a new state; the requeued run resumes
    from the last complete training state. A second Ctrl-C exits at once. Installed only from the main thread.
    """

    def __init__(self, signals: Optional[list[int]] = None, grace_s: Optional[float] = None) -> None:
        self.grace_s = grace_s
        self._timer: Optional[threading.Timer] = None
        self.requested: Optional[int] = None
        self.state_saved = False  # set by finish(): the stop went through a saved training state
        self.previous: dict[int, object] = {}
        if signals is None:
            name = os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
            preempt = getattr(signal, name if name.startswith("SIG") else f"SIG{name}", signal.SIGUSR2)
            signals = [signal.SIGTERM, preempt, signal.SIGINT]
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame) -> None:
        if self.requested == signum:
            log.warning("signal %s again (or no safe point within %s s): leaving without a new training state; a "
                        "resume continues from the last complete one", signal.Signals(signum).name, self.grace_s)
            self._hand_over(signum)
        log.warning("caught signal %s: saving a training state at the next step or stage end, then stopping",
                    signal.Signals(signum).name)
        self.requested = signum
        if self.grace_s is not None and signum != signal.SIGINT:
            self._timer = threading.Timer(self.grace_s, os.kill, (os.getpid(), signum))
            self._timer.daemon = True
            self._timer.start()

    def finish(self) -> None:
        """After the state is saved: pass the signal on to the previous handler, or exit."""
        self.state_saved = True
        self._hand_over(self.requested)

    def _hand_over(self, signum: int) -> None:
        prev = self.previous.get(signum)
        self.restore()
        if callable(prev) and signum != signal.SIGINT:  # Ctrl-C exits (130), it does not raise KeyboardInterrupt  # e.g. submitit's checkpoint_and_try_requeue: requeues the job, then exits
            prev(signum, None)
        raise SystemExit(128 + signum)

    def restore(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for sig, prev in self.previous.items():
            signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
        self.previous = {}
