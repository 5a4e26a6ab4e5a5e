"""Metrics to a JSONL file and TensorBoard scalars in the workdir (process 0 only)."""

from __future__ import annotations

import json
import os
import time

import jax


class MetricsWriter:
  def __init__(self, workdir):
    self.workdir = workdir if workdir and jax.process_index() == 0 else None
    self._f = self._tb = None
    if self.workdir:
      os.makedirs(self.workdir, exist_ok=True)
      self._f = open(os.path.join(self.workdir, "metrics.jsonl"), "a")
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(self.workdir, "tb"))
      except ImportError:
        self._tb = None

  def write(self, step: int, scalars: dict):
    if not self.workdir:
      return
    self._f.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(k, v, step)

  def close(self):
    if self._f:
      self._f.close()
    if self._tb is not None:
      self._tb.close()
