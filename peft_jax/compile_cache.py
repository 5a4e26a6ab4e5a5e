"""JAX's persistent compilation cache for ``train.py``, ``eval.py`` and ``sweep.py``.

A second run of the same job loads its compiled programs from disk instead of compiling
them again (the quickstart's first step: tens of seconds of compilation on 2 CPU cores).
The command-line programs call :func:`enable` before their first computation; library
use (``Trainer`` in a notebook) is untouched unless it calls :func:`enable` itself.

Where: ``$PEFT_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/peft_jax/jax_cache`` (default
``~/.cache/peft_jax/jax_cache``). Off: ``PEFT_JAX_COMPILATION_CACHE=0`` or an empty
``PEFT_JAX_CACHE_DIR``. A cache the user configured for JAX itself
(``JAX_COMPILATION_CACHE_DIR``) is left as it is. Every program is cached, however small
or quick to compile (JAX's defaults skip those under one second, which on CPU is most of
them); the directory is bounded (least recently used entries are evicted beyond
:data:`MAX_BYTES`). The cache never fails a run: a directory that cannot be written is
one warning line and the run compiles as before.

JAX keys an entry by the program, the devices, the compile options, XLA's flags and the
versions of jax and jaxlib, so a hit returns the executable a fresh compilation would
have built (results stay bitwise identical).
"""

from __future__ import annotations

import os
import sys
from typing import Dict, Optional

DIR_ENV = "PEFT_JAX_CACHE_DIR"
SWITCH_ENV = "PEFT_JAX_COMPILATION_CACHE"
#: the cache's bound on disk; beyond it the least recently used entries are evicted
MAX_BYTES = 4 << 30

_OFF = ("0", "false", "no", "off")
_stats: Dict[str, float] = {"hits": 0, "misses": 0, "seconds_saved": 0.0}
_listening = False


def cache_dir() -> Optional[str]:
  """The directory this process would cache in; ``None`` when the cache is switched off."""
  if os.environ.get(SWITCH_ENV, "").strip().lower() in _OFF:
    return None
  if DIR_ENV in os.environ:
    return os.path.expanduser(os.environ[DIR_ENV].strip()) or None
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "peft_jax", "jax_cache")


def enable() -> Optional[str]:
  """Turns the persistent cache on for this process (before its first compilation, or at
  least before the programs that should be cached); returns its directory, or ``None``
  when it is off. Calling it again changes nothing."""
  import jax
  own = jax.config.jax_compilation_cache_dir
  if own:                       # set by the user (JAX_COMPILATION_CACHE_DIR) or before
    _listen()
    return own
  path = cache_dir()
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
    writable = os.access(path, os.W_OK | os.X_OK)
  except OSError:
    writable = False
  if not writable:
    print(f"warning: the compilation cache {path} is not writable; compiling without it "
          f"(set {DIR_ENV}=<dir>, or {SWITCH_ENV}=0 to silence this)", file=sys.stderr)
    return None
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  if _has_filelock():           # eviction needs a lock (it also guards concurrent runs)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  jax.config.update("jax_compilation_cache_dir", path)
  _listen()
  return path


def stats() -> Dict[str, float]:
  """This process's persistent-cache ``hits`` (programs loaded instead of compiled),
  ``misses`` (programs compiled and written) and ``seconds_saved`` (their recorded
  compile time less the time to load them), counted since :func:`enable`."""
  return {"hits": int(_stats["hits"]), "misses": int(_stats["misses"]),
          "seconds_saved": round(_stats["seconds_saved"], 3)}


def _has_filelock() -> bool:
  import importlib.util
  return importlib.util.find_spec("filelock") is not None


def _listen() -> None:
  """Counts JAX's cache events (once per process)."""
  global _listening
  if _listening:
    return
  from jax import monitoring
  _listening = True

  def on_event(event: str, **kwargs):
    if event == "/jax/compilation_cache/cache_hits":
      _stats["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
      _stats["misses"] += 1

  def on_duration(event: str, duration: float, **kwargs):
    if event == "/jax/compilation_cache/compile_time_saved_sec":
      _stats["seconds_saved"] += duration

  monitoring.register_event_listener(on_event)
  monitoring.register_event_duration_secs_listener(on_duration)
