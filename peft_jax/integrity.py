"""Checksums of what a run saves, and the workdir lock.

Manifests
---------
Every checkpoint step directory and every adapter directory gets ``MANIFEST.json``: the
SHA-256 and size of each file in it, written after the files and before the directory
counts as saved. Loading verifies it first: a checkpoint that fails is set aside (the run
falls back to the newest intact one, with a warning naming the file); an adapter that fails
stops with one error line naming the file. Bytes that fail their checksum are never used.

Lock
----
``<workdir>/lock`` holds the host, PID and start time of the run using the workdir
(created with ``O_EXCL``, so two runs cannot both take it). A second run stops with one line
naming the holder; a lock left by a process that is gone (same host, PID not alive) is taken
over with a note. Multi-host runs take it on process 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from typing import Dict, Optional

MANIFEST = "MANIFEST.json"
LOCK = "lock"


class IntegrityError(ValueError):
  """A saved file is missing, truncated or fails its checksum."""


class WorkdirBusy(ValueError):
  """Another live run holds the workdir."""


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(directory: str):
  for root, _, files in os.walk(directory):
    for f in sorted(files):
      p = os.path.join(root, f)
      rel = os.path.relpath(p, directory)
      if rel != MANIFEST and not rel.endswith(".tmp"):
        yield rel, p


def write_manifest(directory: str) -> Dict[str, dict]:
  """Checksums every file under ``directory`` into its ``MANIFEST.json`` (atomically)."""
  entries = {rel: {"sha256": _sha256(p), "size": os.path.getsize(p)}
             for rel, p in _files(directory)}
  tmp = os.path.join(directory, MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"files": entries}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(directory, MANIFEST))
  return entries


def manifest_problem(directory: str) -> Optional[str]:
  """None when every file listed in the manifest is there with its size and checksum;
  otherwise what is wrong, naming the file."""
  mf = os.path.join(directory, MANIFEST)
  if not os.path.isfile(mf):
    return f"{mf} is missing (the save did not finish)"
  try:
    with open(mf) as f:
      entries = json.load(f)["files"]
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f"{mf} is unreadable ({type(e).__name__})"
  for rel, want in sorted(entries.items()):
    p = os.path.join(directory, rel)
    if not os.path.isfile(p):
      return f"{p} is missing"
    size = os.path.getsize(p)
    if size != want["size"]:
      return f"{p} has {size} bytes, {want['size']} were saved (truncated or overwritten)"
    if _sha256(p) != want["sha256"]:
      return f"{p} fails its SHA-256 checksum (the bytes changed after saving)"
  return None


def verify(directory: str, what: str) -> None:
  """:class:`IntegrityError` naming the file when ``directory`` fails its manifest."""
  problem = manifest_problem(directory)
  if problem is not None:
    raise IntegrityError(f"{what} {directory} is damaged: {problem}")


# ----------------------------------------------------------------------------- fault drills

FAULT_ENV = "PEFT_JAX_FAULT"


def fault(point: str) -> None:
  """A fault drill for the tests: with ``PEFT_JAX_FAULT=<point>=kill`` (or ``=int``) set,
  this process sends itself SIGKILL (SIGINT) on reaching ``point`` (``step:N``,
  ``checkpoint:N`` between orbax's write and the manifest, ``adapter`` before the new
  adapter directory is renamed into place). Unset, it does nothing."""
  spec = os.environ.get(FAULT_ENV)
  if not spec or spec.rsplit("=", 1)[0] != point:
    return
  import signal
  sig = signal.SIGINT if spec.endswith("=int") else signal.SIGKILL
  os.environ.pop(FAULT_ENV)        # once
  os.kill(os.getpid(), sig)


# ----------------------------------------------------------------------------- lock

def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def acquire_lock(workdir: str, say=print) -> str:
  """Takes ``<workdir>/lock`` for this process (re-entrant within one process)."""
  path = os.path.join(workdir, LOCK)
  me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
  for _ in range(3):
    try:
      fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      holder = _read_lock(path)
      if holder is None:                 # being written this instant, or empty: look again
        time.sleep(0.2)
        holder = _read_lock(path)
      if holder and holder.get("host") == me["host"] and holder.get("pid") == me["pid"]:
        return path                      # this process holds it already
      if holder is None or (holder.get("host") == me["host"] and not _alive(int(holder["pid"]))):
        who = "an unreadable lock" if holder is None else \
            f"process {holder['pid']} (started {holder.get('since')}), which is gone"
        say(f"note: taking over the lock of {workdir} from {who}")
        try:
          os.remove(path)
        except FileNotFoundError:
          pass
        continue
      raise WorkdirBusy(
          f"workdir {workdir} is in use by another run: pid {holder.get('pid')} on host "
          f"{holder.get('host')} since {holder.get('since')}; wait for it to finish or use "
          f"another --workdir (if that run is gone, delete {path})")
    with os.fdopen(fd, "w") as f:
      json.dump(me, f)
    return path
  raise WorkdirBusy(f"could not take the lock {path}: it keeps reappearing")


def _read_lock(path: str) -> Optional[dict]:
  try:
    with open(path) as f:
      d = json.load(f)
    return d if isinstance(d, dict) and "pid" in d else None
  except (OSError, ValueError):
    return None


def release_lock(workdir: str) -> None:
  """Removes the lock if this process holds it."""
  path = os.path.join(workdir, LOCK)
  holder = _read_lock(path)
  if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
    try:
      os.remove(path)
    except FileNotFoundError:
      pass
