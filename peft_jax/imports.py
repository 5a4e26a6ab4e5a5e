"""Imports that leave out a heavy optional dependency their library reaches only on paths
this project never takes, to shorten every program's start.

- tensorboardX imports torch when it is installed, to accept torch tensors (our scalars
  are floats): about 3 s of the quickstart's start on 2 CPU cores.
- rouge_score's stemmer imports nltk, whose package imports scipy (``scipy.stats`` for a
  collocation measure, ``scipy.sparse`` for a parser; the stemmer uses neither) when it
  can: about 2 s.

:func:`without` blocks such a module only while the import runs, and only when it is not
loaded already; an import of it afterwards works as usual.
"""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def without(*modules: str):
  """While the block runs, ``import m`` raises ImportError for each of ``modules`` not yet
  loaded (a ``None`` entry in ``sys.modules``, Python's documented way to do it); the
  entries are removed afterwards."""
  blocked = [m for m in modules if m not in sys.modules]
  for m in blocked:
    sys.modules[m] = None
  try:
    yield
  finally:
    for m in blocked:
      if m in sys.modules and sys.modules[m] is None:
        del sys.modules[m]
