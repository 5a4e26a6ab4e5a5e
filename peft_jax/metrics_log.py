"""Metrics to a JSONL file and TensorBoard scalars in the workdir (process 0 only).

A resumed run passes the step it resumes from: records after it (written by the interrupted
run, and about to be written again) are dropped from ``metrics.jsonl``, and TensorBoard purges
its events from that step on, so neither holds a step twice."""

from __future__ import annotations

import json
import os
import time

import jax

FILE = "metrics.jsonl"


def _truncate_after(path: str, step: int) -> None:
  if not os.path.exists(path):
    return
  keep = []
  with open(path, errors="replace") as f:
    for line in f:
      try:
        rec = json.loads(line)
      except ValueError:            # a line cut by a kill
        continue
      if step > 0 and isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
        keep.append(json.dumps(rec) + "\n")
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)


def _summary_writer():
  """tensorboardX's ``SummaryWriter``, imported without torch (see peft_jax/imports.py)."""
  from peft_jax.imports import without
  with without("torch"):
    from tensorboardX import SummaryWriter
  return SummaryWriter


class MetricsWriter:
  def __init__(self, workdir, resume_step: int = 0):
    self.workdir = workdir if workdir and jax.process_index() == 0 else None
    self._f = self._tb = None
    if self.workdir:
      os.makedirs(self.workdir, exist_ok=True)
      path = os.path.join(self.workdir, FILE)
      _truncate_after(path, resume_step)
      self._f = open(path, "a")
      try:
        SummaryWriter = _summary_writer()
        self._tb = SummaryWriter(os.path.join(self.workdir, "tb"),
                                 purge_step=resume_step + 1 if resume_step else None)
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
      self._f = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
