"""A graceful stop: SIGINT, SIGTERM or ``STOP_SIGNAL`` ask the training loop to stop after the current step.

The loop checks the request between steps, writes a checkpoint of the step it finished and raises
``TrainingInterrupted``; running the same command again resumes there. A second SIGINT or SIGTERM aborts at
once, without a checkpoint.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

from absl import logging


class TrainingInterrupted(RuntimeError):
  """Raised after SIGINT/SIGTERM/``STOP_SIGNAL`` once the current step is done and a checkpoint is written."""

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum


# Asks a run to stop after the current step and checkpoint, as SIGINT/SIGTERM do, but never counts as a second
# request that aborts: what an ablation sweep sends its training child, which the same job's scheduler may
# signal too.
STOP_SIGNAL = signal.SIGUSR1


class StopRequest:
  """SIGINT/SIGTERM/STOP_SIGNAL handler: asks the loop to stop after the current step; a second SIGINT or
  SIGTERM aborts."""

  def __init__(self):
    self.signum: int | None = None  # The first request's signal.
    self.interrupted = False  # A SIGINT or SIGTERM came: the next one aborts.

  def __call__(self, signum, frame):
    if signum != STOP_SIGNAL:
      if self.interrupted:
        raise KeyboardInterrupt
      self.interrupted = True
    if self.signum is None:
      self.signum = signum
      logging.warning("Received %s: stopping after the current step and writing a checkpoint "
                      "(send SIGINT or SIGTERM again to abort without one).", signal.Signals(signum).name)


@contextlib.contextmanager
def graceful_stop() -> Iterator[StopRequest]:
  """Installs a ``StopRequest`` for SIGINT, SIGTERM and ``STOP_SIGNAL`` while the block runs (from the main
  thread; elsewhere it only yields one that no signal sets), and restores the previous handlers."""
  request = StopRequest()
  if threading.current_thread() is not threading.main_thread():
    yield request  # Signal handlers can only be installed from the main thread.
    return
  previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM, STOP_SIGNAL)}
  try:
    yield request
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)
