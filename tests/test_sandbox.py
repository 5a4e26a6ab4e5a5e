"""The code-execution sandbox: every hostile sample fails, leaves the machine and the files
as they were, and the next sample still runs ("the suite goes on")."""

from __future__ import annotations

import ctypes
import os
import platform
import re
import socket
import subprocess
import tempfile
import time

import pytest

from peft_jax.evals import sandbox, sandbox_child


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
  """Sandbox directories go to a folder of this test, which must be empty afterwards."""
  folder = tmp_path / "sandbox_tmp"
  folder.mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(folder))
  yield folder
  assert list(folder.iterdir()) == [], "a sandbox directory was left behind"


def _group_members(pgid: int):
  """Live or zombie processes whose process group is ``pgid``."""
  members = []
  for pid in os.listdir("/proc"):
    if not pid.isdigit():
      continue
    try:
      with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    except OSError:
      continue
    fields = stat[stat.rindex(")") + 2:].split()
    if int(fields[2]) == pgid:
      members.append(int(pid))
  return members


def _sandbox_processes():
  """Processes running the sandbox's child script (forked copies included)."""
  found = []
  for pid in os.listdir("/proc"):
    if pid.isdigit():
      try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
          if sandbox.CHILD_SCRIPT.encode() in f.read():
            found.append(int(pid))
      except OSError:
        continue
  return found


def _assert_clean(result: sandbox.Result) -> None:
  assert result.pid > 0
  assert _group_members(result.pid) == []
  with pytest.raises(ProcessLookupError):
    os.killpg(result.pid, 0)
  assert _sandbox_processes() == []


def _suite_goes_on() -> None:
  result = sandbox.run_program("print(sum(range(10)))\nassert 1 + 1 == 2\n")
  assert result == sandbox.Result(True, "passed", result.pid)


# ----------------------------------------------------------------------------- capabilities

def _kernel_has_landlock() -> bool:
  if platform.machine() not in ("x86_64", "aarch64"):
    return False
  libc = ctypes.CDLL(None, use_errno=True)
  libc.syscall.restype = ctypes.c_long
  return libc.syscall(ctypes.c_long(444), None, ctypes.c_size_t(0), ctypes.c_uint32(1)) > 0


def _kernel_has_seccomp_filters() -> bool:
  with open("/proc/self/status") as f:
    status = f.read()
  return platform.machine() in ("x86_64", "aarch64") and "Seccomp_filters:" in status


def test_capabilities_report_the_layers_of_this_kernel():
  caps = sandbox.capabilities()
  if not _kernel_has_landlock():
    pytest.skip("this kernel has no Landlock (the sandbox degrades to Unix permissions)")
  assert caps["landlock"] and caps["landlock_abi"] >= 1
  if not _kernel_has_seccomp_filters():
    pytest.skip("no seccomp filters on this kernel/architecture")
  assert caps["seccomp"] and caps["seccomp_arch"] == platform.machine()
  if os.getuid() == 0:
    assert caps["nproc_enforced"] is False   # RLIMIT_NPROC does not bind root.


HEADERS = {
    "x86_64": ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", r"#define __NR_(\w+)\s+(\d+)"),
    "aarch64": ("/usr/include/asm-generic/unistd.h", r"#define __NR(?:3264)?_(\w+)\s+(\d+)"),
}


@pytest.mark.parametrize("arch", sorted(HEADERS))
def test_syscall_numbers_match_the_kernel_headers(arch):
  path, pattern = HEADERS[arch]
  if not os.path.exists(path):
    pytest.skip(f"{path} is absent (install linux-libc-dev)")
  with open(path) as f:
    header = {name: int(number) for name, number in re.findall(pattern, f.read())}
  checked = 0
  for name in sandbox_child._NR:
    number = sandbox_child.nr(name, arch)
    if number is not None and name in header:
      assert number == header[name], name
      checked += 1
  assert checked >= 80


# ----------------------------------------------------------------------------- hostile samples

def test_an_infinite_loop_times_out_and_leaves_no_process():
  start = time.monotonic()
  result = sandbox.run_program("while True:\n  pass\n", timeout=1.0)
  assert result.status == "timed out" and not result.passed
  assert time.monotonic() - start < 5
  _assert_clean(result)
  _suite_goes_on()


FORK_STORM = """
import os, time
children = []
for _ in range(200):
  pid = os.fork()
  if pid == 0:          # Bounded even in a broken sandbox: every child leaves by itself.
    time.sleep(3)
    os._exit(0)
  children.append(pid)
"""


def test_a_fork_storm_fails_at_once_and_leaves_no_process():
  result = sandbox.run_program(FORK_STORM, timeout=2.0)
  assert result.status == "failed: PermissionError: [Errno 1] Operation not permitted"
  _assert_clean(result)
  _suite_goes_on()


def test_subprocesses_and_multiprocessing_fail():
  for source in ("import subprocess\nsubprocess.run(['true'])\n",
                 "import os\nos.system('true')\nassert False\n",
                 "import ctypes\nassert ctypes.CDLL(None).fork() != -1, 'no fork'\n"):
    result = sandbox.run_program(source)
    assert result.status.startswith("failed: "), source
    _assert_clean(result)
  _suite_goes_on()


ATTACKS = {
    "overwrite": "open({victim!r}, 'w').write('changed')",
    "append": "open({victim!r}, 'a').write('changed')",
    "truncate": "import os; os.truncate({victim!r}, 0)",
    "unlink": "import os; os.unlink({victim!r})",
    "rename": "import os; os.rename({victim!r}, {victim!r} + '.moved')",
    "chmod": "import os; os.chmod({victim!r}, 0o777)",
    "utime": "import os; os.utime({victim!r}, (0, 0))",
    "new_file": "open({folder!r} + '/new.txt', 'w').write('new')",
    "mkdir": "import os; os.mkdir({folder!r} + '/newdir')",
    "hardlink_then_write": "import os; os.link({victim!r}, 'h'); open('h', 'w').write('x')",
    "symlink_then_write": "import os; os.symlink({victim!r}, 's'); open('s', 'w').write('x')",
    "rmtree": "import shutil; shutil.rmtree({folder!r})",
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_files_outside_the_sample_directory_stay_as_they_were(attack, tmp_path):
  folder = tmp_path / "project"
  folder.mkdir()
  victim = folder / "victim.txt"
  victim.write_text("original")
  os.chmod(victim, 0o644)
  before = (sorted(os.listdir(folder)), os.stat(victim).st_mode, os.stat(victim).st_mtime_ns)
  result = sandbox.run_program(ATTACKS[attack].format(victim=str(victim), folder=str(folder)))
  assert result.status.startswith("failed: ") and "Error" in result.status, result.status
  assert victim.read_text() == "original"
  assert (sorted(os.listdir(folder)), os.stat(victim).st_mode, os.stat(victim).st_mtime_ns) == before
  _suite_goes_on()


def test_files_in_the_users_home_cannot_be_removed(tmp_path, monkeypatch):
  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))   # A stand-in home; the real one is never touched.
  precious = home / "precious.txt"
  precious.write_text("keep me")
  for source in (f"import os\nos.remove({str(precious)!r})\n",
                 f"import shutil\nshutil.rmtree({str(home)!r})\n",
                 "import os, shutil\nshutil.rmtree(os.path.expanduser('~'))\n"
                 f"os.remove({str(precious)!r})\n"):
    result = sandbox.run_program(source)
    assert result.status.startswith("failed: ") and "Error" in result.status, result.status
    assert precious.read_text() == "keep me"
  _suite_goes_on()


def test_a_10_gb_allocation_fails_out_of_memory():
  result = sandbox.run_program("data = bytearray(10 * 2**30)\n")
  assert result.status.startswith("failed: out of memory"), result.status
  _assert_clean(result)
  _suite_goes_on()


def test_no_network_and_nothing_reaches_a_local_server():
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    for source in (f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n",
                   "import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n",
                   "import socket\nsocket.socketpair()\n",
                   "import socket\nsocket.socket(socket.AF_UNIX)\n"):
      result = sandbox.run_program(source)
      assert result.status == "failed: PermissionError: [Errno 1] Operation not permitted", source
    server.setblocking(False)
    with pytest.raises(BlockingIOError):
      server.accept()
  _suite_goes_on()


def test_other_processes_cannot_be_signalled():
  sleeper = subprocess.Popen(["sleep", "30"])
  try:
    for source in (f"import os, signal\nos.kill({sleeper.pid}, signal.SIGKILL)\n",
                   "import os, signal\nos.kill(-1, signal.SIGKILL)\n",
                   "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"):
      result = sandbox.run_program(source)
      assert result.status.startswith("failed: PermissionError"), (source, result.status)
    assert sleeper.poll() is None
  finally:
    sleeper.kill()
    sleeper.wait()
  _suite_goes_on()


# ----------------------------------------------------------------------------- verdicts

def test_a_normal_program_writes_its_own_directory_prints_and_passes():
  source = (
      "import os, tempfile, threading\n"
      "open('here.txt', 'w').write('a')\n"
      "fd, path = tempfile.mkstemp()\n"
      "os.write(fd, b'b'); os.close(fd)\n"
      "assert path.startswith(os.getcwd()) and os.environ['HOME'] == os.getcwd()\n"
      "os.mkdir('sub'); os.rename('here.txt', 'sub/there.txt'); os.remove(path)\n"
      "t = threading.Thread(target=print, args=('from a thread',)); t.start(); t.join()\n"
      "print(open('sub/there.txt').read())\n")
  assert sandbox.run_program(source).status == "passed"


@pytest.mark.parametrize("source, status", [
    ("exit(1)", "failed: SystemExit: 1"),
    ("import sys\nsys.exit(0)", "failed: SystemExit: 0"),
    ("import os\nos._exit(0)", "failed: the program exited before its end (exit status 0)"),
    ("assert 1 == 2", "failed: AssertionError"),
    ("assert False, 'wrong answer'", "failed: AssertionError: wrong answer"),
    ("raise ValueError('bad\\nvalue')", "failed: ValueError: bad value"),
    ("def f(:\n  pass", "failed: SyntaxError: invalid syntax (program.py, line 1)"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", "failed: killed by signal 9"),
])
def test_failures_say_why(source, status):
  result = sandbox.run_program(source)
  assert (result.passed, result.status) == (False, status)


def test_run_programs_keeps_the_order_and_reports_progress():
  calls = []
  sources = ["pass", "assert False", "while True: pass", "print(1)"]
  results = sandbox.run_programs(sources, timeout=1.0, workers=2,
                                 progress=lambda done, total: calls.append((done, total)))
  assert [r.status for r in results] == ["passed", "failed: AssertionError", "timed out", "passed"]
  assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_a_sandbox_that_does_not_match_capabilities_fails_closed(monkeypatch):
  monkeypatch.setattr(sandbox, "_expected_layers", lambda: "landlock=99 seccomp=none nproc=0")
  with pytest.raises(sandbox.SandboxError, match="expected"):
    sandbox.run_program("print(1)")


def test_bad_limits_are_refused():
  with pytest.raises(ValueError, match="timeout"):
    sandbox.run_program("pass", timeout=0)
  with pytest.raises(ValueError, match="memory_mb"):
    sandbox.run_program("pass", memory_mb=8)


def test_a_cpu_hog_with_threads_times_out():
  source = ("import threading, time\n"
            "def spin():\n  while True: pass\n"
            "for _ in range(4): threading.Thread(target=spin, daemon=True).start()\n"
            "time.sleep(30)\n")
  result = sandbox.run_program(source, timeout=1.0)
  assert result.status == "timed out"
  _assert_clean(result)


def test_a_program_cannot_forge_the_verdict_or_a_setup_error():
  source = ("import os\n"
            "for fd in range(3, 64):\n"
            "  try:\n    os.write(fd, b'X forged\\nP forged\\n')\n"
            "  except OSError:\n    pass\n"
            "os._exit(0)\n")
  result = sandbox.run_program(source)
  assert result.status == "failed: the program exited before its end (exit status 0)"
