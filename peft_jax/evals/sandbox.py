"""Run untrusted generated programs (HumanEval completions) one process each, locked down.

``run_program(source, timeout=3.0, memory_mb=2048)`` writes ``source`` to a fresh temporary
directory, starts ``python -I -B peft_jax/evals/sandbox_child.py`` in a new session, and
returns a :class:`Result`: ``passed`` and a human-eval-style ``status`` (``"passed"``,
``"timed out"`` or ``"failed: <reason>"``). ``run_programs`` runs many in a thread pool,
one child process per thread. The parent and the child use the standard library only.

What the sandbox guarantees (on Linux x86_64/aarch64 with Landlock and seccomp, which
:func:`capabilities` reports; on this project's machine: Landlock ABI 7, seccomp x86_64,
running as root):

* **One process, then nothing left.** The child runs in its own session and process
  group. At the end (pass, failure or timeout) the parent SIGKILLs the whole group while
  the leader is still unreaped (so the group id cannot have been reused), then reaps it,
  then removes the temporary directory.
* **No new processes.** seccomp fails ``fork``, ``vfork`` and ``clone`` without
  ``CLONE_THREAD`` with EPERM (``clone3`` with ENOSYS, so libc falls back to ``clone``):
  a fork bomb fails at its first fork, whatever the uid (``RLIMIT_NPROC`` is not
  enforced for root, so it is only an extra layer for unprivileged users). Threads work.
* **Time.** The wall clock starts when the program starts (the interpreter's start-up is
  not charged) and ends it after ``timeout`` s: ``"timed out"``, as in human-eval.
  ``RLIMIT_CPU`` (``ceil(timeout) + 1`` s, counted from start-up) backs it up.
* **Memory.** ``RLIMIT_AS`` = ``memory_mb`` MiB of address space: a large allocation
  raises MemoryError, reported as ``"failed: out of memory (MemoryError...)"``.
* **No network.** seccomp fails ``socket`` and ``socketpair`` (so no TCP/UDP, no unix
  sockets, no netlink) and io_uring; from Landlock ABI 4 TCP bind/connect are denied too.
* **Files.** Landlock denies every write-like access (write, truncate, create, make
  directory/link/symlink/fifo/socket/device, remove, rename, cross-directory links) on
  the whole file system except beneath the sample's temporary directory (where device
  nodes stay forbidden) and writing ``/dev/null``. seccomp also denies what Landlock does
  not mediate: chmod/chown/xattr/utime changes, mknod, mounts, ``open_by_handle_at``,
  inode-flag ioctls (immutable), terminal input injection (TIOCSTI). ``cwd``, ``HOME``
  and ``TMPDIR`` are the temporary directory; the environment is minimal.
* **Other processes and the system.** Signals reach only the process itself (seccomp
  on ``kill``/``tgkill``/``rt_*sigqueueinfo``; Landlock ABI 6 scopes signals too);
  ``ptrace``, ``process_vm_*``, ``pidfd_getfd``, namespaces, modules, kexec, bpf,
  perf, keyrings, clock and host-name changes, reboot, swap, raising rlimits and
  changing other processes' priorities/affinities are denied. ``PR_SET_NO_NEW_PRIVS``
  makes set-uid binaries harmless. Syscalls newer than the table (number >= 470) answer
  ENOSYS; on x86_64 the x32 ABI is refused and any other audit arch kills the process.
* **A pass is a pass.** ``"passed"`` needs the program to run to its end: the child
  reports success with a secret token the parent sent it, so ``exit(0)``,
  ``sys.exit(0)`` and ``os._exit(0)`` before the end fail (human-eval also fails them).
* **Fail closed.** If the kernel offers a layer (per :func:`capabilities`) and the child
  cannot apply it, or reports other layers than expected, the program is not run and
  :class:`SandboxError` is raised: a broken sandbox does not quietly score samples.

What it does NOT guarantee:

* **Reads are not restricted.** The program can read any file the user can (keys,
  the data, the project). With no network and no writes outside its directory, it can
  only leak them into its own stdout/stderr, which the parent discards except for the
  last line of stderr (used in ``status``).
* **Disk usage** in its directory is bounded only by ``RLIMIT_FSIZE`` (64 MiB) per file
  and by the time limit; the directory is removed afterwards. Memory is bounded by
  address space (``RLIMIT_AS``), not by a cgroup: page cache and kernel memory are not
  counted, and ``run_programs`` may run ``workers`` children at once.
* **The verdict is not tamper-proof** against code written to cheat: the program runs
  in the same interpreter as the child's reporting code and could find the token. The
  sandbox protects the machine; it does not make scores adversarially robust (neither
  does human-eval, which runs the program in-process).
* **Degraded kernels.** Without Landlock (kernels < 5.13, Landlock disabled, other
  architectures) files are protected only by Unix permissions: as root, not at all.
  Without seccomp (other architectures) there is no fork, network or syscall
  protection; only ``RLIMIT_NPROC`` for non-root users. :func:`capabilities` says which
  layers are active; the child applies whatever is there.
* **Kernel bugs and side channels** (CPU, timing, /proc information) are out of scope;
  this is not a container or a VM. The seccomp layer is a deny list, not an allow list.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Callable, Iterable, List, Optional

from peft_jax.evals import sandbox_child

CHILD_SCRIPT = os.path.abspath(sandbox_child.__file__)
#: How long the child may take to start Python and lock itself down (not charged to the
#: program's ``timeout``).
SETUP_TIMEOUT = 60.0
STATUS_LIMIT = 300


class SandboxError(RuntimeError):
  """The sandbox itself failed (the program was not judged)."""


@dataclasses.dataclass(frozen=True)
class Result:
  """``passed`` and the human-eval-style ``status``; ``pid`` is the child's pid, which
  was also its process-group id (for checks that nothing is left)."""
  passed: bool
  status: str
  pid: int = 0


# ----------------------------------------------------------------------------- capabilities

@functools.lru_cache(maxsize=None)
def capabilities() -> dict:
  """Which layers are active on this machine (the child applies exactly these)."""
  abi = sandbox_child.landlock_abi()
  arch = sandbox_child.seccomp_arch()
  return {
      "landlock": abi > 0,
      "landlock_abi": abi,
      "landlock_net": abi >= 4,
      "landlock_signal_scope": abi >= 6,
      "seccomp": arch is not None,
      "seccomp_arch": arch,
      "nproc_enforced": sandbox_child.nproc_enforced(),
      "no_new_privs": True,
      "rlimits": ["AS", "CPU", "FSIZE", "CORE", "NOFILE"],
  }


def _expected_layers() -> str:
  caps = capabilities()
  return (f"landlock={caps['landlock_abi']} seccomp={caps['seccomp_arch'] or 'none'} "
          f"nproc={int(caps['nproc_enforced'])}")


# ----------------------------------------------------------------------------- one program

def run_program(source: str, timeout: float = 3.0, memory_mb: int = 2048) -> Result:
  """Run ``source`` in the sandbox (see the module docstring) and judge it."""
  if not (timeout > 0 and math.isfinite(timeout)):
    raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
  if int(memory_mb) < 64:
    raise ValueError(f"memory_mb must be at least 64 (the interpreter needs it), got {memory_mb!r}")
  root = tempfile.mkdtemp(prefix="peftjax-sandbox-")
  try:
    work = os.path.join(root, "work")
    os.mkdir(work, 0o700)
    program = os.path.join(root, "program.py")
    with open(program, "w", encoding="utf-8") as f:
      f.write(source)
    return _run(program, work, os.path.join(root, "stderr"), float(timeout), int(memory_mb))
  finally:
    shutil.rmtree(root, ignore_errors=True)


def _environment(work: str) -> dict:
  return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": work, "TMPDIR": work,
          "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "OMP_NUM_THREADS": "1"}


def _run(program: str, work: str, stderr_path: str, timeout: float, memory_mb: int) -> Result:
  token = secrets.token_hex(16)
  cpu_seconds = math.ceil(timeout) + 1
  read_fd, write_fd = os.pipe()
  try:
    with open(stderr_path, "wb") as err:
      proc = subprocess.Popen(
          [sys.executable, "-I", "-B", CHILD_SCRIPT, str(write_fd), program, work,
           str(memory_mb * 2**20), str(cpu_seconds)],
          stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err, cwd=work,
          env=_environment(work), pass_fds=(write_fd,), start_new_session=True)
  except BaseException:
    os.close(read_fd)
    raise
  finally:
    os.close(write_fd)
  try:
    try:
      proc.stdin.write(token.encode())
      proc.stdin.close()
    except OSError:
      pass   # The child died at once; its exit status tells why.
    messages, timed_out = _watch(proc.pid, read_fd, timeout)
  finally:
    _kill_group(proc.pid)
    proc.wait()
    os.close(read_fd)
  return Result(*_verdict(proc.returncode, messages, timed_out, _tail(stderr_path), token),
                pid=proc.pid)


def _exited(pid: int) -> bool:
  """Whether the child has exited, without reaping it (its pid stays reserved)."""
  return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _watch(pid: int, read_fd: int, timeout: float):
  """Collect the child's status lines until it exits or runs out of time. The program's
  clock starts with the child's ``S`` line. Returns (messages, timed_out)."""
  buffer, eof, started = b"", False, False
  deadline = time.monotonic() + SETUP_TIMEOUT
  while True:
    if _exited(pid):
      buffer += _drain(read_fd)
      return _lines(buffer), False
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      if not started and not any(m.startswith("S") for m in _lines(buffer)):
        raise SandboxError(f"the sandboxed interpreter did not start within {SETUP_TIMEOUT} s")
      return _lines(buffer), True
    if eof:
      time.sleep(min(remaining, 0.005))
      continue
    ready, _, _ = select.select([read_fd], [], [], min(remaining, 0.05))
    if not ready:
      continue
    chunk = os.read(read_fd, 4096)
    if not chunk:
      eof = True
      continue
    buffer += chunk
    if not started and any(m.startswith("S ") for m in _lines(buffer)):
      started, deadline = True, time.monotonic() + timeout


def _drain(read_fd: int) -> bytes:
  chunks = []
  while select.select([read_fd], [], [], 0)[0]:
    chunk = os.read(read_fd, 4096)
    if not chunk:
      break
    chunks.append(chunk)
  return b"".join(chunks)


def _lines(buffer: bytes) -> List[str]:
  return [line for line in buffer.decode("utf-8", "replace").split("\n") if line]


def _kill_group(pid: int) -> None:
  try:
    os.killpg(pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass


def _tail(path: str) -> str:
  """The last non-empty line of the child's stderr."""
  try:
    with open(path, "rb") as f:
      f.seek(max(0, os.path.getsize(path) - 8192))
      text = f.read().decode("utf-8", "replace")
  except OSError:
    return ""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return lines[-1] if lines else ""


def _short(text: str) -> str:
  text = " ".join(text.split())
  return text if len(text) <= STATUS_LIMIT else text[:STATUS_LIMIT - 3] + "..."


def _failed(reason: str) -> str:
  if "MemoryError" in reason or "Cannot allocate memory" in reason:
    return _short(f"failed: out of memory ({reason})")
  return _short(f"failed: {reason}")


def _verdict(returncode: int, messages: List[str], timed_out: bool, stderr_tail: str,
             token: str):
  """(passed, status) from what the child said and how it ended. Only the child writes
  before its ``S`` line; after it the program could write too, so there a setup error
  (``X``) is ignored, and the pass line must carry the token."""
  by_kind, passes = {}, []
  for message in messages:
    kind, _, text = message.partition(" ")
    if kind == "X" and "S" not in by_kind:
      raise SandboxError(f"the sandbox could not be set up: {text}")
    if kind == "P":
      passes.append(text)
    by_kind.setdefault(kind, text)
  if "S" in by_kind and by_kind["S"] != _expected_layers():
    raise SandboxError(f"the child applied {by_kind['S']!r}, expected {_expected_layers()!r}")
  if timed_out:
    return False, "timed out"
  if returncode < 0:
    if -returncode == signal.SIGXCPU:
      return False, "timed out"
    return False, f"failed: killed by signal {-returncode}"
  if "S" not in by_kind:
    raise SandboxError(f"the sandboxed interpreter exited with status {returncode} before "
                       f"starting the program: {stderr_tail or 'no message'}")
  if returncode == 0 and token in passes:
    return True, "passed"
  if "E" in by_kind:
    return False, _failed(by_kind["E"])
  if returncode == 0:
    return False, "failed: the program exited before its end (exit status 0)"
  return False, _failed(stderr_tail or f"exit status {returncode}")


# ----------------------------------------------------------------------------- many programs

def run_programs(sources: Iterable[str], timeout: float = 3.0, memory_mb: int = 2048,
                 workers: Optional[int] = None,
                 progress: Optional[Callable[[int, int], None]] = None) -> List[Result]:
  """:func:`run_program` for each source, ``workers`` at a time (default: the CPU count);
  results in input order. ``progress(done, total)`` is called after each."""
  sources = list(sources)
  results: List[Optional[Result]] = [None] * len(sources)
  workers = max(1, workers or os.cpu_count() or 1)
  with ThreadPoolExecutor(max_workers=workers) as pool:
    futures = {pool.submit(run_program, s, timeout, memory_mb): i for i, s in enumerate(sources)}
    for done, future in enumerate(as_completed(futures), 1):
      results[futures[future]] = future.result()
      if progress is not None:
        progress(done, len(sources))
  return results
