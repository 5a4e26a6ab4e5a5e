"""Huge pages for the host allocations of XLA:CPU (``train.py``, ``eval.py``, ``bench.py``).

XLA:CPU allocates one buffer for all of a step's temporaries at every execution (the
LLaMA benchmark's full fine-tuning step: 1.4 GB) through ``posix_memalign``; glibc serves
such a size with a fresh ``mmap`` and unmaps it on free, so each step faults every page
of it in again, zero-filled: about 350,000 page faults and 0.6 s of kernel time per
2.5 s step on 2 CPU cores, and more on a virtual machine whose host reclaims the freed
pages. (Torch's activations are smaller allocations that glibc keeps in its heap and
reuses.) With glibc's ``glibc.malloc.hugetlb=1`` tunable, glibc advises transparent huge
pages for its mappings (``madvise(MADV_HUGEPAGE)``), so the same buffer takes 2 MiB
faults: about 1,000 per step. Results do not change (the allocator only), nor does the
peak resident memory (measured: 2,677 vs 2,682 MiB).

Huge pages alone leave a cost: XLA's threads still map each step's buffer afresh, and on
this project's 2-core VM some steps (often every other one) spend 0.6-2 s of kernel time
zeroing new huge pages (``perf``: ``clear_page_erms``). Keeping the memory in one heap
(``arena_max=1:mmap_max=0`` and a huge ``trim_threshold``) removed those spikes in a
training loop but fragmented the heap across training and generation: the benchmark's
T5 rows peaked 1.05-1.30x HF's memory, so it is not done. The cost of those fresh pages
comes from the VM: its balloon device has free page reporting on (virtio feature bit 5;
``/sys/module/page_reporting/parameters/page_reporting_order`` = 9), so free 2 MiB blocks
are handed back to the host within about 2 s and the next touch of such a block is a
host fault as well. In one T5 LoRA step the same loss-gradient fusion took 15 ms when
its 64 MB output landed on kept pages and 223-406 ms when it did not. With
``mmap_max=0`` and a huge ``trim_threshold`` but glibc's default arenas the spikes stay;
adding ``arena_max=2`` removed most (median 1.58 vs 1.87 s) but raised the process's
peak from 1,948 to 2,662 MB and still had a 4.5 s step.

glibc reads tunables when a process starts, so the command-line programs re-execute
themselves once with ``GLIBC_TUNABLES`` extended (:func:`reexec_with_huge_pages`, before
any other work), and the benchmark starts its peft-jax worker with it
(:func:`with_huge_pages`). Nothing happens off Linux/glibc, when transparent huge pages
are disabled (``/sys/kernel/mm/transparent_hugepage/enabled`` is ``[never]``), when the
tunable is already set, or with ``PEFT_JAX_HUGE_PAGES=0``.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Dict, Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
SWITCH_ENV = "PEFT_JAX_HUGE_PAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def available() -> bool:
  """Linux with glibc, transparent huge pages not ``[never]``, and not switched off."""
  if os.environ.get(SWITCH_ENV, "").strip().lower() in ("0", "false", "no", "off"):
    return False
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    with open(_THP) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def with_huge_pages(env: Mapping[str, str]) -> Dict[str, str]:
  """``env`` with :data:`TUNABLE` added to ``GLIBC_TUNABLES`` (when :func:`available`)."""
  out = dict(env)
  if not available():
    return out
  have = out.get("GLIBC_TUNABLES", "")
  if "glibc.malloc.hugetlb=" not in have:
    out["GLIBC_TUNABLES"] = f"{have}:{TUNABLE}" if have else TUNABLE
  return out


def reexec_with_huge_pages(argv: Optional[list] = None) -> None:
  """Re-executes this Python process with :data:`TUNABLE` set, once; returns only when
  there is nothing to do (already set, not :func:`available`). Call it first in a
  program's ``__main__`` block: the process is replaced, arguments unchanged."""
  env = with_huge_pages(os.environ)
  if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
    return
  argv = list(argv if argv is not None else getattr(sys, "orig_argv", []))
  if not argv:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable] + argv[1:], env)
  except OSError:               # cannot re-execute: run as it is
    return
