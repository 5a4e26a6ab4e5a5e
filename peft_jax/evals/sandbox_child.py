"""The child side of :mod:`peft_jax.evals.sandbox`: lock this process down, then run one
program.

:mod:`peft_jax.evals.sandbox` starts this file *by path* as
``python -I -B sandbox_child.py STATUS_FD PROGRAM WORKDIR MEMORY_BYTES CPU_SECONDS``
(isolated mode: no ``PYTHON*`` variables, no user site, no script directory on
``sys.path``; ``-B``: no ``.pyc`` writes). It therefore imports nothing but the standard
library. Before the program runs it applies, in this order:

1. resource limits: address space (``RLIMIT_AS``), CPU seconds, file size, no core
   files, open files, and ``RLIMIT_NPROC`` where the kernel enforces it for this user;
2. ``prctl(PR_SET_NO_NEW_PRIVS)``, so no exec can gain privileges (and so an
   unprivileged process may install the next two layers);
3. a Landlock ruleset (when the kernel has Landlock) that denies every kind of write,
   removal, creation, rename, link, truncation and device ioctl on the whole file system
   except beneath WORKDIR (and writing ``/dev/null``); from ABI 4 also TCP bind/connect,
   from ABI 6 signals to processes outside this one and abstract unix sockets;
4. a seccomp-BPF filter (x86_64 and aarch64) that denies ``socket``/``socketpair``,
   process creation (``fork``, ``vfork``, ``clone`` without ``CLONE_THREAD``; ``clone3``
   answers ENOSYS so libc falls back to ``clone``), signals to other processes, and a
   list of syscalls that change the system or files in ways Landlock does not see
   (chmod/chown/xattr/utime, mounts, namespaces, ptrace, modules, raising rlimits,
   io_uring, ...); see :func:`seccomp_program`.

It then tells the parent ``S <layers>`` on the status pipe, runs the program in a fresh
``__main__`` module, and reports ``P <token>`` when the program ran to its end (the
token is a secret the parent sent on stdin, so an early ``os._exit(0)`` is not a pass),
``E <ExceptionType: message>`` when it raised (``SystemExit`` included), or
``X <reason>`` when a layer that the kernel offers could not be applied (the program is
then never run). The probes (:func:`landlock_abi`, :func:`seccomp_arch`,
:func:`nproc_enforced`) are shared with the parent's ``capabilities()``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import resource
import struct
import sys

_LIBC = ctypes.CDLL(None, use_errno=True)
_LIBC.syscall.restype = ctypes.c_long
_LIBC.prctl.restype = ctypes.c_int

PR_SET_NO_NEW_PRIVS = 38
PR_GET_SECCOMP = 21
PR_SET_SECCOMP = 22
SECCOMP_MODE_FILTER = 2
SECCOMP_GET_ACTION_AVAIL = 2

# ----------------------------------------------------------------------------- syscalls

#: Syscall numbers per architecture (uname machine), checked against the kernel headers
#: by the tests. ``None`` marks a syscall the architecture does not have.
ARCHES = {
    "x86_64": {"audit": 0xC000003E, "x32_bit": 0x40000000},
    "aarch64": {"audit": 0xC00000B7, "x32_bit": None},
}
_NR = {
    # name: (x86_64, aarch64)
    "socket": (41, 198), "socketpair": (53, 199),
    "fork": (57, None), "vfork": (58, None), "clone": (56, 220), "clone3": (435, 435),
    "kill": (62, 129), "tkill": (200, 130), "tgkill": (234, 131),
    "rt_sigqueueinfo": (129, 138), "rt_tgsigqueueinfo": (297, 240),
    "pidfd_send_signal": (424, 424), "pidfd_getfd": (438, 438),
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "chmod": (90, None), "fchmod": (91, 52), "fchmodat": (268, 53), "fchmodat2": (452, 452),
    "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54),
    "setxattr": (188, 5), "lsetxattr": (189, 6), "fsetxattr": (190, 7),
    "removexattr": (197, 14), "lremovexattr": (198, 15), "fremovexattr": (199, 16),
    "setxattrat": (463, 463), "removexattrat": (466, 466), "file_setattr": (469, 469),
    "utime": (132, None), "utimes": (235, None), "futimesat": (261, None),
    "utimensat": (280, 88),
    "mknod": (133, None), "mknodat": (259, 33),
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "open_tree": (428, 428), "move_mount": (429, 429), "fsopen": (430, 430),
    "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "mount_setattr": (442, 442), "open_tree_attr": (467, 467),
    "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142),
    "sethostname": (170, 161), "setdomainname": (171, 162),
    "settimeofday": (164, 170), "clock_settime": (227, 112), "clock_adjtime": (305, 266),
    "adjtimex": (159, 171),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "bpf": (321, 280), "perf_event_open": (298, 241),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "unshare": (272, 97), "setns": (308, 268),
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "userfaultfd": (323, 282),
    "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427),
    "setrlimit": (160, 164), "prlimit64": (302, 261),
    "setpriority": (141, 140), "sched_setparam": (142, 118),
    "sched_setscheduler": (144, 119), "sched_setaffinity": (203, 122),
    "sched_setattr": (314, 274), "ioprio_set": (251, 30),
    "migrate_pages": (256, 238), "move_pages": (279, 239),
    "acct": (163, 89), "quotactl": (179, 60), "quotactl_fd": (443, 443),
    "syslog": (103, 116), "iopl": (172, None), "ioperm": (173, None),
    "vhangup": (153, 58), "fanotify_init": (300, 262), "lookup_dcookie": (212, 18),
    "nfsservctl": (180, 42), "ioctl": (16, 29), "seccomp": (317, 277),
}

#: Denied outright with EPERM (those missing on an architecture are skipped).
DENIED = (
    "socket", "socketpair", "fork", "vfork", "tkill", "pidfd_send_signal", "pidfd_getfd",
    "ptrace", "process_vm_readv", "process_vm_writev",
    "chmod", "fchmod", "fchmodat", "fchmodat2", "chown", "fchown", "lchown", "fchownat",
    "setxattr", "lsetxattr", "fsetxattr", "removexattr", "lremovexattr", "fremovexattr",
    "setxattrat", "removexattrat", "file_setattr",
    "utime", "utimes", "futimesat", "utimensat", "mknod", "mknodat",
    "mount", "umount2", "pivot_root", "chroot", "open_tree", "move_mount", "fsopen",
    "fsconfig", "fsmount", "fspick", "mount_setattr", "open_tree_attr",
    "swapon", "swapoff", "reboot", "sethostname", "setdomainname",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "unshare", "setns",
    "open_by_handle_at", "name_to_handle_at", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register",
    "setrlimit", "setpriority", "sched_setparam", "sched_setscheduler",
    "sched_setaffinity", "sched_setattr", "ioprio_set", "migrate_pages", "move_pages",
    "acct", "quotactl", "quotactl_fd", "syslog", "iopl", "ioperm", "vhangup",
    "fanotify_init", "lookup_dcookie", "nfsservctl",
)
#: Syscall numbers from here on (newer than this table) answer ENOSYS; libc falls back.
FIRST_UNKNOWN_NR = 470
CLONE_THREAD = 0x00010000
#: ioctl requests denied: terminal input injection, inode flags (immutable, append-only).
DENIED_IOCTLS = (0x5412, 0x541C, 0x40086602, 0x40046602, 0x401C5820)

EPERM, ENOSYS = 1, 38


def nr(name: str, arch: str):
  """The syscall number of ``name`` on ``arch`` (None when the arch lacks it)."""
  return _NR[name][tuple(ARCHES).index(arch)]


def _syscall(number: int, *args) -> int:
  result = _LIBC.syscall(ctypes.c_long(number), *args)
  if result == -1:
    err = ctypes.get_errno()
    raise OSError(err, os.strerror(err))
  return result


# ----------------------------------------------------------------------------- probes

def landlock_abi() -> int:
  """The kernel's Landlock ABI version, 0 when Landlock is absent or disabled."""
  if platform.machine() not in ARCHES:
    return 0   # Only these syscall numbers (444..446) are known here.
  try:
    return int(_syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))
  except OSError:
    return 0


def seccomp_arch():
  """The machine name when seccomp filters work here and its syscall table is known,
  else None."""
  arch = platform.machine()
  if arch not in ARCHES:
    return None
  action = ctypes.c_uint32(0x00050000)   # SECCOMP_RET_ERRNO
  try:
    _syscall(nr("seccomp", arch), ctypes.c_long(SECCOMP_GET_ACTION_AVAIL), ctypes.c_long(0),
             ctypes.byref(action))
  except OSError:
    return None
  return arch


def nproc_enforced() -> bool:
  """Whether RLIMIT_NPROC binds this process: the kernel exempts root and holders of
  CAP_SYS_ADMIN or CAP_SYS_RESOURCE."""
  if os.getuid() == 0:
    return False
  try:
    with open("/proc/self/status") as f:
      caps = next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))
  except (OSError, StopIteration, ValueError):
    return True
  return not caps & ((1 << 21) | (1 << 24))   # CAP_SYS_ADMIN, CAP_SYS_RESOURCE


def _user_tasks() -> int:
  """How many tasks (threads included) this real uid runs now, as RLIMIT_NPROC counts."""
  uid, count = str(os.getuid()), 0
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f if ":" in line)
      if fields["Uid"].split()[0] == uid:
        count += int(fields["Threads"])
    except (OSError, KeyError, ValueError):
      continue
  return count


# ----------------------------------------------------------------------------- layers

FILE_SIZE_LIMIT = 64 * 2**20
OPEN_FILES_LIMIT = 256
THREADS_ALLOWED = 64


def apply_rlimits(memory_bytes: int, cpu_seconds: int) -> None:
  limits = [
      (resource.RLIMIT_AS, memory_bytes),
      (resource.RLIMIT_CPU, cpu_seconds),
      (resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT),
      (resource.RLIMIT_CORE, 0),
      (resource.RLIMIT_NOFILE, OPEN_FILES_LIMIT),
  ]
  if nproc_enforced():
    limits.append((resource.RLIMIT_NPROC, _user_tasks() + THREADS_ALLOWED))
  for which, value in limits:
    resource.setrlimit(which, (value, value))
  # RLIMIT_CPU: SIGXCPU at the soft limit; the hard limit is the same (SIGKILL).


def set_no_new_privs() -> None:
  if _LIBC.prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), ctypes.c_ulong(1), ctypes.c_ulong(0),
                 ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")


# Landlock file-system rights (include/uapi/linux/landlock.h).
FS_WRITE_FILE, FS_REMOVE_DIR, FS_REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
FS_MAKE_CHAR, FS_MAKE_DIR, FS_MAKE_REG, FS_MAKE_SOCK = 1 << 6, 1 << 7, 1 << 8, 1 << 9
FS_MAKE_FIFO, FS_MAKE_BLOCK, FS_MAKE_SYM = 1 << 10, 1 << 11, 1 << 12
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1


class _RulesetAttr(ctypes.Structure):
  _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
              ("scoped", ctypes.c_uint64)]


class _PathBeneathAttr(ctypes.Structure):
  _pack_ = 1
  _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_handled(abi: int) -> int:
  """Every write-like file-system right that this ABI knows (reads and execution are
  left alone)."""
  rights = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_CHAR | FS_MAKE_DIR
            | FS_MAKE_REG | FS_MAKE_SOCK | FS_MAKE_FIFO | FS_MAKE_BLOCK | FS_MAKE_SYM)
  if abi >= 2:
    rights |= FS_REFER
  if abi >= 3:
    rights |= FS_TRUNCATE
  if abi >= 5:
    rights |= FS_IOCTL_DEV
  return rights


def apply_landlock(workdir: str, abi: int) -> None:
  """Deny writes everywhere but beneath ``workdir`` (where device nodes stay forbidden)
  and ``/dev/null``; add the network and scope restrictions the ABI offers."""
  handled = landlock_handled(abi)
  attr = _RulesetAttr(handled, 0, 0)
  size = 8
  if abi >= 4:
    attr.handled_access_net, size = NET_BIND_TCP | NET_CONNECT_TCP, 16
  if abi >= 6:
    attr.scoped, size = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL, 24
  ruleset = _syscall(444, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
  try:
    _allow_beneath(ruleset, workdir, handled & ~(FS_MAKE_CHAR | FS_MAKE_BLOCK | FS_IOCTL_DEV))
    _allow_beneath(ruleset, "/dev/null", handled & (FS_WRITE_FILE | FS_TRUNCATE))
    _syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0))
  finally:
    os.close(ruleset)


def _allow_beneath(ruleset: int, path: str, rights: int) -> None:
  fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
  try:
    rule = _PathBeneathAttr(rights, fd)
    _syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0))
  finally:
    os.close(fd)


# seccomp-BPF (classic BPF over struct seccomp_data: nr @0, arch @4, args[i] @16 + 8 i).
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
RET_KILL_PROCESS, RET_ALLOW = 0x80000000, 0x7FFF0000


def _ret_errno(errno: int) -> int:
  return 0x00050000 | errno


def _ins(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
  return struct.pack("<HBBI", code, jt, jf, k & 0xFFFFFFFF)


def _load_arg(index: int, high: bool = False) -> bytes:
  return _ins(_LD_W_ABS, 16 + 8 * index + (4 if high else 0))


def _arg_in(index: int, values, on_match: int, otherwise: int) -> list:
  """Load the low 32 bits of argument ``index``; return ``on_match`` if it is one of
  ``values``, else ``otherwise``."""
  n = len(values)
  block = [_load_arg(index)]
  block += [_ins(_JEQ, v, jt=n - i) for i, v in enumerate(values)]
  return block + [_ins(_RET, otherwise), _ins(_RET, on_match)]


def seccomp_program(arch: str, pid: int) -> bytes:
  """The filter: the wrong audit arch kills; x32 and unknown-new syscalls fail; DENIED
  syscalls fail with EPERM; ``clone`` only makes threads; signals only reach ``pid``
  (the process itself, which is also its own process group) ; ``prlimit64`` may only
  read; a few ioctls fail; everything else is allowed."""
  info = ARCHES[arch]
  prog = [_ins(_LD_W_ABS, 4), _ins(_JEQ, info["audit"], jt=1), _ins(_RET, RET_KILL_PROCESS),
          _ins(_LD_W_ABS, 0)]
  if info["x32_bit"]:
    prog += [_ins(_JSET, info["x32_bit"], jf=1), _ins(_RET, _ret_errno(ENOSYS))]
  prog += [_ins(_JGE, FIRST_UNKNOWN_NR, jf=1), _ins(_RET, _ret_errno(ENOSYS))]

  def rule(name: str, block: list) -> None:
    number = nr(name, arch)
    if number is not None:
      prog.extend([_ins(_LD_W_ABS, 0), _ins(_JEQ, number, jf=len(block))] + block)

  for name in DENIED:
    rule(name, [_ins(_RET, _ret_errno(EPERM))])
  rule("clone3", [_ins(_RET, _ret_errno(ENOSYS))])
  rule("clone", [_load_arg(0), _ins(_JSET, CLONE_THREAD, jf=1), _ins(_RET, RET_ALLOW),
                 _ins(_RET, _ret_errno(EPERM))])
  own = (0, pid, -pid)      # kill(0) and kill(-pid) reach the own group, i.e. itself.
  rule("kill", _arg_in(0, own, RET_ALLOW, _ret_errno(EPERM)))
  for name in ("tgkill", "rt_sigqueueinfo", "rt_tgsigqueueinfo"):
    rule(name, _arg_in(0, (pid,), RET_ALLOW, _ret_errno(EPERM)))
  rule("prlimit64", [_load_arg(2), _ins(_JEQ, 0, jf=3), _load_arg(2, high=True),
                     _ins(_JEQ, 0, jf=1), _ins(_RET, RET_ALLOW), _ins(_RET, _ret_errno(EPERM))])
  rule("ioctl", _arg_in(1, DENIED_IOCTLS, _ret_errno(EPERM), RET_ALLOW))
  prog.append(_ins(_RET, RET_ALLOW))
  return b"".join(prog)


class _SockFprog(ctypes.Structure):
  _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def apply_seccomp(arch: str) -> None:
  code = seccomp_program(arch, os.getpid())
  buf = ctypes.create_string_buffer(code, len(code))
  prog = _SockFprog(len(code) // 8, ctypes.cast(buf, ctypes.c_void_p))
  if _LIBC.prctl(ctypes.c_int(PR_SET_SECCOMP), ctypes.c_ulong(SECCOMP_MODE_FILTER),
                 ctypes.byref(prog), ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"prctl(PR_SET_SECCOMP): {os.strerror(err)}")


# ----------------------------------------------------------------------------- running

def _one_line(text: str, limit: int = 300) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def exception_line(exc: BaseException) -> str:
  """``Type: message`` (just ``Type`` for an empty message), on one line."""
  message = str(exc)
  return _one_line(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


def _read_token() -> bytes:
  chunks = []
  while True:
    chunk = os.read(0, 256)
    if not chunk:
      break
    chunks.append(chunk)
  null = os.open(os.devnull, os.O_RDONLY)
  os.dup2(null, 0)
  os.close(null)
  return b"".join(chunks).strip()


def lock_down(workdir: str, memory_bytes: int, cpu_seconds: int) -> str:
  """Apply every layer this kernel offers; returns them as ``name=value`` words."""
  apply_rlimits(memory_bytes, cpu_seconds)
  set_no_new_privs()
  abi, arch = landlock_abi(), seccomp_arch()
  if abi:
    apply_landlock(workdir, abi)
  if arch:
    apply_seccomp(arch)
  return f"landlock={abi} seccomp={arch or 'none'} nproc={int(nproc_enforced())}"


def main(argv) -> None:
  status_fd, program, workdir = int(argv[1]), argv[2], argv[3]
  memory_bytes, cpu_seconds = int(argv[4]), int(argv[5])
  write, stdout, stderr = os.write, sys.stdout, sys.stderr

  def report(kind: str, text: str) -> None:
    write(status_fd, f"{kind} {text}\n".encode("utf-8", "replace"))

  token = _read_token()
  try:
    with open(program, encoding="utf-8") as f:
      source = f.read()
    layers = lock_down(workdir, memory_bytes, cpu_seconds)
  except BaseException as exc:   # The program never runs on a half-built sandbox.
    report("X", exception_line(exc))
    os._exit(3)
  import builtins
  import types
  module = types.ModuleType("__main__")
  module.__file__, module.__builtins__ = program, builtins
  sys.modules["__main__"], sys.argv = module, [program]
  report("S", layers)
  try:
    exec(compile(source, program, "exec"), module.__dict__)
  except BaseException as exc:
    line = exception_line(exc)
    try:
      import traceback
      traceback.print_exc()
    except BaseException:
      pass
    report("E", line)
    _flush(stdout, stderr)
    os._exit(1)
  write(status_fd, b"P " + token + b"\n")
  _flush(stdout, stderr)
  os._exit(0)   # Threads the program left running do not hold the verdict back.


def _flush(*streams) -> None:
  for stream in streams:
    try:
      stream.flush()
    except BaseException:
      pass


if __name__ == "__main__":
  main(sys.argv)
