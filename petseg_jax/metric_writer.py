"""A run's TensorBoard event files: scalars (``tf.summary.scalar``), and where a resumed attempt starts.

TensorFlow is imported when a writer is made, not with this module: the model and step functions import on
accelerator hosts that have JAX but no TensorFlow (see ``train``).
"""

from __future__ import annotations

import os
import time

from absl import logging


class SummaryWriter:
  """Scalars into one event file of ``logdir``, read by ``tensorboard --logdir <workdir>``."""

  def __init__(self, logdir: str | os.PathLike):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top  # See the module docstring.
    self._tf = tf
    self._writer = tf.summary.create_file_writer(str(logdir))

  def scalar(self, tag: str, value: float, step: int) -> None:
    """Writes ``value`` as the point of curve ``tag`` at ``step``."""
    with self._writer.as_default():
      self._tf.summary.scalar(tag, value, step=step)

  def mark_start(self, step: int) -> None:
    """Records that this attempt trains on from ``step``: TensorBoard then shows the later steps once.

    An attempt killed after logging beyond its last checkpoint leaves points that the resumed attempt logs
    again. On a ``SessionLog(START)`` event at step S + 1, TensorBoard discards the points it has read before
    it with a step >= S + 1 (``purge_orphaned_data``; tests/test_train.py reads the events with the loader of
    ``--load_fast=false``; the Rust data server of ``--load_fast=true`` showed the same curve, checked by hand
    with tensorboard 2.21 and tensorboard-data-server 0.7.2).
    """
    tf = self._tf
    event = tf.compat.v1.Event(wall_time=time.time(), step=step + 1,
                               session_log=tf.compat.v1.SessionLog(status=tf.compat.v1.SessionLog.START))
    # tf.summary has no call for a whole Event. ImportEvent writes one through this writer, into its file in
    # order with the scalars, as TensorFlow's own (unexported) summary_ops_v2.import_event does.
    resource = getattr(self._writer, "_resource", None)
    if resource is None:  # A TensorFlow that changed its writer: no reason to stop a training run.
      logging.warning("Cannot mark the start of step %d in the TensorBoard events (TensorFlow %s); TensorBoard "
                      "may show the steps after it twice.", step + 1, tf.__version__)
      return
    tf.raw_ops.ImportEvent(writer=resource, event=event.SerializeToString())

  def flush(self) -> None:
    """Writes the buffered events to the file."""
    self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the event file."""
    self._writer.close()
