"""Every shell command in the README runs as written (training shortened, sweeps as dry
runs, workdirs in a temporary folder), so the README cannot drift from the code."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
# a shortened training run: a few steps, a few evaluation rows
SHORT = ["--config.train.num_steps=3", "--config.data.max_eval_examples=8",
         "--config.train.eval_at_start=false"]


def _blocks():
  text = open(README, encoding="utf-8").read()
  out = []
  for m in re.finditer(r"```bash\n(.*?)```", text, re.S):
    lines = []
    for line in m.group(1).replace("\\\n", " ").splitlines():
      line = line.split("  #")[0].strip()       # an end-of-line comment
      if line:
        lines.append(line)
    out.append(lines)
  return out


def _segments(line):
  return [s.strip() for s in line.split("&&")]


BLOCKS = _blocks()
RUNNABLE = [i for i, b in enumerate(BLOCKS)
            if any(seg.startswith(("python train.py", "python eval.py", "python sweep.py"))
                   for line in b for seg in _segments(line))]


def test_readme_has_the_two_commands_and_ci_runs_the_test_command():
  install = [seg for b in BLOCKS for line in b for seg in _segments(line)
             if seg.startswith("pip install")]
  assert "pip install -c constraints/project.txt -e ." in install          # the main job
  assert 'pip install -c constraints/project.txt -e ".[test]"' in install  # the tests
  ci = open(os.path.join(REPO, ".ci", "run")).read()
  assert 'pip install -q -c constraints/project.txt -e ".[test]"' in ci
  assert re.search(r"^python -m pytest\b", ci, re.M)
  tests = [line for b in BLOCKS for line in b if line.endswith("python -m pytest")]
  assert tests, "the README's test command is missing"


def test_refresh_script_is_valid_bash():
  cmds = [line for b in BLOCKS for line in b if line.startswith("bash scripts/")]
  assert cmds
  for c in cmds:
    script = os.path.join(REPO, shlex.split(c)[1])
    assert subprocess.run(["bash", "-n", script]).returncode == 0, script


def _prepare(block, tmp):
  """The block's python commands, with workdirs moved under ``tmp`` and runs shortened;
  placeholder commands (``...``) are left out."""
  paths = {}
  for line in block:
    for m in re.finditer(r"--(?:workdir|output)=(\S+)", line):
      paths[m.group(1)] = os.path.join(tmp, os.path.basename(m.group(1).rstrip("/")))
  cmds = []
  for line in block:
    for seg in _segments(line):
      if not seg.startswith(("python train.py", "python eval.py", "python sweep.py")):
        continue
      if "..." in seg:
        continue          # a placeholder (e.g. the multi-host launch), not a command
      for old, new in paths.items():
        seg = seg.replace(old, new)
      args = shlex.split(seg)[1:]
      if args[0] == "train.py" and not {"--plan", "--dry_run", "--print_config"} & set(args):
        args += SHORT
      if args[0] == "sweep.py":
        args += ["--dry_run"]       # checks every point's fields, runs nothing
      cmds.append(args)
  return cmds


@pytest.mark.parametrize("i", RUNNABLE, ids=[f"block{i}" for i in RUNNABLE])
def test_readme_block_runs(i, tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
  for args in _prepare(BLOCKS[i], str(tmp_path)):
    r = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    if "--print_config" in args:
      assert "train.learning_rate = " in r.stdout
    elif args[0] in ("train.py", "eval.py"):
      json.loads(r.stdout.strip().splitlines()[-1])     # each ends with its JSON line
