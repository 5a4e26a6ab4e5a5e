"""The command line of ``train.py`` and ``eval.py``: ``--config.<section>.<field>=<value>``
overrides (taken out of ``argv`` before absl parses its flags), the resolved config, and
one ``error: ...`` line with exit status 2 for every bad input."""

from __future__ import annotations

from typing import List, Tuple

from peft_jax.config_lib import ConfigError


def split_config_args(argv: List[str]) -> Tuple[List[Tuple[str, str]], List[str]]:
  """``--config.<section>.<field>=<value>`` (or ``... <value>``) arguments out of ``argv``:
  (overrides in order, the other arguments)."""
  from peft_jax.config_lib import parse_override
  overrides, rest, i = [], [], 0
  while i < len(argv):
    a = argv[i]
    if a.startswith("--config."):
      if "=" not in a:
        if i + 1 >= len(argv):
          raise ConfigError(f"{a} needs a value: {a}=<value>")
        a, i = f"{a}={argv[i + 1]}", i + 1
      overrides.append(parse_override(a))
    else:
      rest.append(a)
    i += 1
  return overrides, rest


#: the ``--config.*`` overrides of this process's command line (set by :func:`run_cli`)
CONFIG_OVERRIDES: List[Tuple[str, str]] = []


def load_config(spec: str, say=print):
  """The resolved config of ``--config=spec`` plus this command line's overrides; the
  notes (a switched method or data set) are printed."""
  from peft_jax import config_lib
  cfg, notes = config_lib.load(spec, CONFIG_OVERRIDES)
  for n in notes:
    say(f"note: {n}")
  return cfg


def run_cli(main_fn, huge_pages: bool = True):
  """Runs ``main_fn`` under absl. A bad command line, config, checkpoint or data set
  prints one line (``error: ...``) and exits with status 2, before any compute.
  ``huge_pages``: first re-execute the process with glibc's transparent-huge-page
  tunable (:mod:`peft_jax.host_memory`; XLA:CPU's per-step temporaries)."""
  import sys
  if huge_pages:
    from peft_jax.host_memory import reexec_with_huge_pages
    reexec_with_huge_pages()
  from absl import app, flags
  from peft_jax.checkpoint.hf import CheckpointError
  from peft_jax.peft.base import PeftConfigError
  from peft_jax.data.common import DataError

  def fail(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)

  try:
    overrides, rest = split_config_args(sys.argv[1:])
  except ConfigError as e:
    fail(e)
  CONFIG_OVERRIDES[:] = overrides

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(str(e).splitlines()[0] + " (see --help)")

  def wrapped(argv):
    try:
      return main_fn(argv)
    except (PeftConfigError, CheckpointError, ConfigError, DataError) as e:
      fail(e)
    except KeyboardInterrupt:   # before the training loop took over the signal
      print("interrupted before training started; nothing was saved", file=sys.stderr)
      sys.exit(130)
    except OSError as e:      # a full or read-only disk while saving; earlier saves are intact
      where = f" ({e.filename})" if getattr(e, "filename", None) else ""
      fail(f"{e.strerror or e}{where}; what was saved before is intact")
    except RuntimeError as e:
      name = type(e).__name__
      if name == "Interrupted":
        print(str(e), file=sys.stderr)
        sys.exit(130)
      if name != "TrainingDiverged":
        raise
      fail(e, 3)

  app.run(wrapped, argv=[sys.argv[0]] + rest, flags_parser=parse_flags)
