"""peft_jax/host_memory.py: the command-line programs run with glibc's huge-page tunable."""

import os
import subprocess
import sys
import textwrap

import pytest

from peft_jax import host_memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_with_huge_pages_adds_the_tunable_once_and_keeps_the_users(monkeypatch):
  monkeypatch.delenv(host_memory.SWITCH_ENV, raising=False)
  if not host_memory.available():
    pytest.skip("not Linux/glibc with transparent huge pages (the tunable is not used)")
  assert host_memory.with_huge_pages({})["GLIBC_TUNABLES"] == host_memory.TUNABLE
  env = host_memory.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
  assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{host_memory.TUNABLE}"
  assert host_memory.with_huge_pages(env) == env
  mine = {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}   # the user's own choice stays
  assert host_memory.with_huge_pages(mine) == mine
  monkeypatch.setenv(host_memory.SWITCH_ENV, "0")
  assert host_memory.with_huge_pages({}) == {}


@pytest.mark.parametrize("switch", ["", "0"])
def test_a_program_reexecutes_itself_with_the_tunable(tmp_path, switch):
  script = tmp_path / "prog.py"
  script.write_text(textwrap.dedent("""
      import os, sys
      print("start", os.getpid(), flush=True)
      from peft_jax.host_memory import reexec_with_huge_pages
      reexec_with_huge_pages()
      print("tunables", os.environ.get("GLIBC_TUNABLES", ""), "args", sys.argv[1:])
  """))
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  env["PYTHONPATH"] = REPO
  env[host_memory.SWITCH_ENV] = switch
  out = subprocess.run([sys.executable, "-u", str(script), "a", "--b=1"], env=env,
                       capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
  assert out.returncode == 0, out.stderr
  lines = out.stdout.splitlines()
  assert lines[-1].endswith("args ['a', '--b=1']")
  starts = [line for line in lines if line.startswith("start")]
  if switch == "" and host_memory.available():
    assert len(starts) == 2 and len(set(starts)) == 1     # once more, the same process
    assert lines[-1].startswith(f"tunables {host_memory.TUNABLE} ")
  else:
    assert len(starts) == 1 and lines[-1].startswith("tunables  ")
