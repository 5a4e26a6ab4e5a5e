"""The pinned install (constraints/): every dependency that pyproject.toml names is pinned
to one exact version that satisfies pyproject's bound, and, in CI (which installs from the
pins), the installed versions are exactly the pinned ones."""
import importlib.metadata
import os
import pathlib
import re


import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11 (the pins are for 3.11)")
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins(name):
  pins = {}
  for line in (ROOT / "constraints" / name).read_text().splitlines():
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
    assert m, f"constraints/{name}: {line!r} is not 'name==version'"
    key = canonicalize_name(m.group(1))
    assert key not in pins, f"constraints/{name}: {key} pinned twice"
    pins[key] = m.group(2)
  return pins


def _requirements():
  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  reqs = list(project["dependencies"])
  for extra in project.get("optional-dependencies", {}).values():
    reqs += extra
  return [Requirement(r) for r in reqs]


def test_every_dependency_is_pinned_within_its_bound():
  pins = _pins("project.txt")
  reqs = _requirements()
  assert reqs
  for req in reqs:
    key = canonicalize_name(req.name)
    assert key in pins, f"{req.name} (pyproject.toml) has no pin in constraints/project.txt"
    assert req.specifier.contains(Version(pins[key]), prereleases=True), (
        f"constraints/project.txt pins {req.name}=={pins[key]}, outside pyproject's {req}")


def test_adapterhub_pins():
  pins = _pins("adapterhub.txt")
  for name in ("adapters", "transformers", "torch", "safetensors", "numpy"):
    assert name in pins, f"constraints/adapterhub.txt has no pin for {name}"
  # the AdapterHub parity tests state the version they compare against
  assert pins["adapters"] == "1.3.0"
  assert pins["torch"] == _pins("project.txt")["torch"]


@pytest.mark.skipif(os.environ.get("CI") != "true",
                    reason="only CI is guaranteed to install from constraints/ (.ci/run sets CI=true)")
def test_ci_installed_exactly_the_pins():
  wrong = {}
  for key, version in _pins("project.txt").items():
    try:
      got = importlib.metadata.version(key)
    except importlib.metadata.PackageNotFoundError:
      got = None
    # the local label is not pinned: torch 2.13.0+cpu satisfies torch==2.13.0
    if got is None or Version(Version(got).public) != Version(version):
      wrong[key] = (version, got)
  assert not wrong, f"installed versions differ from constraints/project.txt: {wrong}"
