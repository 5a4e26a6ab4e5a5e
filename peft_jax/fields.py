"""Typed config fields: one declaration per knob (default, kind, range, one-line doc).

A :class:`Field` is how every configurable value is declared where it is used: a PEFT
method's hyperparameters (``Method.hparams``), a data set's loader knobs, the sections of
the experiment config (``config_lib``). The same declaration

* parses a command-line string (``--config.peft.r=4``, ``--grid peft.r=4,8``) into a
  typed value (:meth:`Field.parse`),
* checks a value from a config file or the command line (:meth:`Field.check`), before
  any weights or data are touched, with one line naming what was expected,
* documents the knob (``train.py --print_config``).

Kinds: ``int``, ``float`` (ints accepted), ``bool``, ``str``, ``names`` (module names:
a comma list, ``"all-linear"``, or a regex string over module paths), ``ints`` (a layer
list: an int, a comma list, or in a config file a ``{stack: [..]}`` dict), ``strs`` (a
tuple of strings), ``bool_or_str`` (``True``/``False`` or a keyword among ``choices``),
``any`` (a Python literal; checked by its owner).
"""

from __future__ import annotations

import ast
import dataclasses
from typing import Any, Callable, Optional, Sequence, Tuple

KINDS = ("int", "float", "bool", "str", "names", "ints", "strs", "bool_or_str", "any")
_REGEX_CHARS = set(".*+?()[]{}|^$\\/")
_NONE_WORDS = ("none", "null")


class FieldError(ValueError):
  """A value that does not fit its field (the message says what was expected)."""


@dataclasses.dataclass(frozen=True)
class Field:
  default: Any
  doc: str
  kind: str = ""                       # inferred from the default when empty
  optional: Optional[bool] = None      # None allowed; default: True when the default is None
  choices: Tuple[Any, ...] = ()
  ge: Optional[float] = None           # numeric range: >= ge, > gt, <= le, < lt
  gt: Optional[float] = None
  le: Optional[float] = None
  lt: Optional[float] = None
  check_fn: Optional[Callable[[Any], Optional[str]]] = None   # value -> problem or None

  def __post_init__(self):
    if not self.kind:
      object.__setattr__(self, "kind", _infer_kind(self.default))
    if self.kind not in KINDS:
      raise ValueError(f"unknown field kind {self.kind!r}; expected one of {KINDS}")
    if self.optional is None:
      object.__setattr__(self, "optional", self.default is None)

  # ---------------------------------------------------------------- text -> value
  def parse(self, text: str) -> Any:
    """A command-line string as a typed value (not yet range-checked)."""
    t = text.strip()
    if self.optional and t.lower() in _NONE_WORDS:
      return None
    k = self.kind
    try:
      if k == "int":
        return int(t)
      if k == "float":
        return float(t)
      if k == "bool":
        return _bool(t)
      if k == "str":
        return text
      if k == "names":
        return _names(t)
      if k == "ints":
        return [int(x) for x in t.split(",") if x.strip()]
      if k == "strs":
        return tuple(x.strip() for x in t.split(",") if x.strip())
      if k == "bool_or_str":
        try:
          return _bool(t)
        except ValueError:
          return t
      return _literal(t)
    except ValueError:
      raise FieldError(f"{text!r} is not {self.expected()}") from None

  # ---------------------------------------------------------------- value check
  def normalise(self, value: Any) -> Any:
    """The value in its canonical type (``"q,v"`` -> ``["q", "v"]``; an int stays an int
    in a float field), or :class:`FieldError`."""
    if value is None:
      if self.optional:
        return None
      raise FieldError(f"None is not {self.expected()}")
    k = self.kind
    ok = True
    if k == "int":
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif k == "float":
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif k == "bool":
      ok = isinstance(value, bool)
    elif k == "str":
      ok = isinstance(value, str)
    elif k == "names":
      if isinstance(value, str):
        value = _names(value)
      ok = isinstance(value, str) or (isinstance(value, (list, tuple)) and
                                      all(isinstance(x, str) for x in value))
      value = list(value) if isinstance(value, tuple) else value
    elif k == "ints":
      if isinstance(value, str):
        try:
          value = self.parse(value)
        except FieldError:
          ok = False
      if isinstance(value, dict):
        ok = all(isinstance(s, str) and (_int_or_ints(v) or v == "all") for s, v in value.items())
      elif ok:
        ok = _int_or_ints(value)
        value = list(value) if isinstance(value, tuple) else value
    elif k == "strs":
      if isinstance(value, str):
        value = self.parse(value)
      ok = isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value)
      value = tuple(value) if ok else value
    elif k == "bool_or_str":
      ok = isinstance(value, (bool, str))
    elif k == "any" and isinstance(self.default, tuple) and isinstance(value, list):
      value = tuple(value)        # a tuple read back from JSON
    if not ok:
      raise FieldError(f"{value!r} is not {self.expected()}")
    if self.choices and value not in self.choices and not (
        k == "bool_or_str" and isinstance(value, bool)):
      raise FieldError(f"{value!r} is not {self.expected()}")
    if k in ("int", "float"):
      for bound, op, word in ((self.ge, lambda a, b: a >= b, ">="), (self.gt, lambda a, b: a > b, ">"),
                              (self.le, lambda a, b: a <= b, "<="), (self.lt, lambda a, b: a < b, "<")):
        if bound is not None and not op(value, bound):
          raise FieldError(f"{value!r} is not {self.expected()}")
    if self.check_fn is not None:
      problem = self.check_fn(value)
      if problem:
        raise FieldError(f"{value!r}: {problem}")
    return value

  def expected(self) -> str:
    """What the field accepts, in words (used in error messages)."""
    k = self.kind
    words = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string",
             "names": "module names (a comma list, 'all-linear' or a regex)",
             "ints": "layer indices (an int or a comma list of ints; in a config file a "
                     "{name: ints or 'all'} dict)",
             "strs": "a comma list of names", "bool_or_str": "true, false",
             "any": "a Python literal"}[k]
    if self.choices:
      listed = ", ".join(repr(c) for c in self.choices)
      words = (f"{words} or one of {listed}" if k == "bool_or_str" else f"one of {listed}")
    rng = [f"{w} {b:g}" for w, b in ((">=", self.ge), (">", self.gt), ("<=", self.le),
                                      ("<", self.lt)) if b is not None]
    if rng:
      words += " " + " and ".join(rng)
    if self.optional:
      words += " (or none)"
    return words


def _infer_kind(default) -> str:
  if isinstance(default, bool):
    return "bool"
  if isinstance(default, int):
    return "int"
  if isinstance(default, float):
    return "float"
  if isinstance(default, str):
    return "str"
  if isinstance(default, tuple):
    return "strs"
  return "any"


def _bool(t: str) -> bool:
  low = t.strip().lower()
  if low in ("true", "1", "yes", "on"):
    return True
  if low in ("false", "0", "no", "off"):
    return False
  raise ValueError(t)


def _names(t: str):
  """``"q,v"`` -> ``["q", "v"]``; ``"all-linear"`` and regexes stay strings (HF PEFT);
  ``""`` -> ``[]``."""
  t = t.strip()
  if t == "all-linear" or (_REGEX_CHARS & set(t)):
    return t
  return [x.strip() for x in t.split(",") if x.strip()]


def _int_or_ints(v) -> bool:
  is_int = lambda x: isinstance(x, int) and not isinstance(x, bool)
  return is_int(v) or (isinstance(v, (list, tuple)) and all(is_int(x) for x in v))


def _literal(t: str):
  try:
    return ast.literal_eval(t)
  except (ValueError, SyntaxError):
    return t


def did_you_mean(name: str, options: Sequence[str]) -> str:
  """``"; did you mean 'x'?"`` for the closest option, or ``""``."""
  import difflib
  best = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
  return f"; did you mean {best[0]!r}?" if best else ""
