"""Model selection: which checkpoint of a run is best on validation (seed 000's protocol).

Seed 000 selects, for every run, the checkpoint with the best validation score and reports
that checkpoint's score on the test split. The trainer records every validation evaluation
of a checkpointed step in ``<workdir>/selection.json``::

  {"metric": "exact_match", "split": "validation",
   "evaluations": {"50": {"exact_match": 0.81, "eval_loss": 0.4}, "100": {...}},
   "best_step": 50, "best": 0.81, "last_step": 100}

- The final step counts: its checkpoint is saved before the final evaluation (so a failed
  evaluation loses nothing) and the evaluation is recorded afterwards. With
  ``train.eval_every=0`` the final step is the only candidate, so it is the best.
- Best is the highest metric; ties go to the earliest step (the first checkpoint to reach
  the score). The untuned evaluation at step 0 has no checkpoint and is not a candidate.
- The checkpoint rotation (``train.keep_last``) never deletes the selected step
  (``trainer._Checkpointer`` preserves it). This file, not orbax's per-step metrics, decides
  which one that is: orbax's BestN keeps the *latest* of equal scores, and the final
  checkpoint's metric is only known after it is saved.
- A resumed run forgets evaluations after the step it resumes from (those steps are
  trained again); a checkpoint set aside (diverged, damaged) is forgotten with it.

``resolve_step(workdir, "best" | "last" | N)`` turns ``eval.py --step`` into a step, and
``evaluate_checkpoint`` is eval.py (callable in-process).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

SELECTION = "selection.json"


class SelectionError(ValueError):
  """No such step, or no best recorded (one line for the command line)."""


def path(workdir: str) -> str:
  return os.path.join(workdir, SELECTION)


def read(workdir: str) -> Optional[dict]:
  """The workdir's selection record, or None when it has none."""
  p = path(workdir)
  if not os.path.isfile(p):
    return None
  try:
    with open(p) as f:
      rec = json.load(f)
    if not isinstance(rec.get("evaluations"), dict):
      raise ValueError("no 'evaluations' object")
    return rec
  except (OSError, ValueError, AttributeError) as e:
    raise SelectionError(f"{p} is unreadable ({type(e).__name__}: {e}); it records the "
                         "validation score of each checkpoint") from None


class Selection:
  """The validation scores of a run's checkpoints and the best of them (see the module
  docstring). ``workdir=None``: kept in memory only; ``write=False``: never written (the
  other processes of a multi-host run keep the same record without touching the file)."""

  def __init__(self, workdir: Optional[str], metric: str, split: str = "validation",
               write: bool = True):
    self.workdir, self.metric, self.split = workdir, metric, split
    self.write_file = bool(workdir) and write
    self.evaluations: Dict[int, Dict[str, float]] = {}
    self.last_step: Optional[int] = None
    rec = read(workdir) if workdir else None
    if rec is not None:
      self.evaluations = {int(k): dict(v) for k, v in rec["evaluations"].items()}
      self.last_step = rec.get("last_step")

  # ------------------------------------------------------------------ queries
  def best(self) -> Tuple[Optional[int], Optional[float]]:
    """(step, score) of the best evaluation by ``metric`` (earliest on ties)."""
    step, score = None, -math.inf
    for s in sorted(self.evaluations):
      v = self.evaluations[s].get(self.metric)
      if isinstance(v, (int, float)) and not math.isnan(v) and v > score:
        step, score = s, float(v)
    return step, (None if step is None else score)

  @property
  def best_step(self) -> Optional[int]:
    return self.best()[0]

  # ------------------------------------------------------------------ updates
  def record(self, step: int, result: Dict[str, Any], final: bool = False) -> None:
    """The validation result of checkpointed ``step`` (its numeric entries)."""
    self.evaluations[int(step)] = {k: float(v) for k, v in result.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if final:
      self.last_step = int(step)
    self._write()

  def drop_after(self, step: int) -> None:
    """Forgets evaluations after ``step`` (a run resuming from ``step`` trains them again)."""
    gone = [s for s in self.evaluations if s > step]
    for s in gone:
      del self.evaluations[s]
    if gone or (self.last_step is not None and self.last_step > step):
      self.last_step = None
      self._write()

  def forget(self, step: int) -> None:
    """Forgets one step (its checkpoint was set aside)."""
    if self.evaluations.pop(int(step), None) is not None:
      self._write()

  def to_json(self) -> dict:
    step, score = self.best()
    return {"metric": self.metric, "split": self.split,
            "evaluations": {str(s): self.evaluations[s] for s in sorted(self.evaluations)},
            "best_step": step, "best": score, "last_step": self.last_step}

  def _write(self) -> None:
    if not self.write_file:
      return
    p = path(self.workdir)
    tmp = p + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.to_json(), f, indent=2)
    os.replace(tmp, p)


# ---------------------------------------------------------------------- eval.py --step


def checkpoint_steps(workdir: str) -> List[int]:
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(n) for n in os.listdir(d)
                if n.isdigit() and os.path.isdir(os.path.join(d, n)))


def resolve_step(workdir: str, spec: str) -> Tuple[int, str]:
  """(step, how it was chosen) for ``--step=best|last|N`` in a train.py workdir; one
  :class:`SelectionError` line when there is no such checkpoint."""
  steps = checkpoint_steps(workdir)
  have = (f"checkpoints in {workdir}/checkpoints: {', '.join(map(str, steps))}" if steps
          else f"{workdir}/checkpoints holds no checkpoint")
  spec = str(spec).strip().lower()
  if spec == "last":
    if not steps:
      raise SelectionError(f"--step=last: {have}")
    return steps[-1], "last"
  if spec == "best":
    rec = read(workdir)
    best = rec.get("best_step") if rec else None
    if best is None:
      why = (f"{path(workdir)} is missing" if rec is None
             else f"{path(workdir)} holds no validation evaluation")
      raise SelectionError(f"--step=best: no best checkpoint is recorded ({why}: the run "
                           f"evaluated no checkpoint on validation yet); use --step=last or "
                           f"--step=N ({have})")
    if int(best) not in steps:
      raise SelectionError(f"--step=best: the best step {best} recorded in {path(workdir)} "
                           f"has no checkpoint ({have})")
    return int(best), "best"
  if not spec.isdigit():
    raise SelectionError(f"--step={spec}: expected best, last or a step number")
  if int(spec) not in steps:
    raise SelectionError(f"--step={spec}: no checkpoint of step {spec} ({have})")
  return int(spec), "step"


# ---------------------------------------------------------------------- eval.py

#: what a checkpoint's leaves depend on: an eval ``--config`` must agree with the run on these
RUN_FIXED = ("model", "tokenizer", "peft", "train.seed")


def checkpoint_kind(path: str) -> Tuple[str, str]:
  """``("adapter" | "workdir", directory)`` of ``eval.py --checkpoint``, or a ConfigError."""
  from peft_jax import inputs
  if os.path.isfile(os.path.join(path, "peft_config.json")):
    return "adapter", path
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir", path
  if os.path.isfile(os.path.join(path, "adapter", "peft_config.json")):
    return "adapter", os.path.join(path, "adapter")   # a workdir whose checkpoints are gone
  raise inputs.ConfigError(f"--checkpoint {path} is neither a train.py workdir (expected "
                           f"{path}/checkpoints/) nor an adapter directory (expected "
                           "peft_config.json)")


def _check_against_run(cfg, recorded: dict, workdir: str) -> None:
  from peft_jax import inputs
  from peft_jax.trainer import _flat_config
  old, new = _flat_config(recorded), _flat_config(cfg.to_dict())
  fixed = lambda k: any(k == f or k.startswith(f + ".") for f in RUN_FIXED)  # noqa: E731
  changed = sorted(k for k in set(old) | set(new) if fixed(k) and old.get(k) != new.get(k))
  if changed:
    shown = "; ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
    raise inputs.ConfigError(
        f"--config differs from the config of the run in {workdir} on what its checkpoints "
        f"depend on ({shown}{' ...' if len(changed) > 4 else ''}); leave --config out to "
        "use the run's own config.json")


@dataclasses.dataclass
class Loaded:
  """A checkpoint ready to evaluate: ``model.apply({"params": params}, ...)`` with the
  prepared parameters (base plus method)."""
  cfg: Any
  mc: Any
  built: Any
  state: Any
  model: Any
  params: Any                  # the prepared tree the model reads
  tokenizer: Any
  kind: str                    # workdir | adapter | hf_adapter | base
  where: Optional[str]
  step: Optional[int]
  chosen: str                  # best | last | step | adapter | hf_adapter | base
  default_out: Optional[str]   # where reports go unless --output says otherwise

  def describe(self) -> str:
    if self.kind == "workdir":
      return f"{os.path.abspath(self.where)} step {self.step} ({self.chosen})"
    if self.kind == "base":
      return "the base model alone"
    return f"{self.kind.replace('_', ' ')} {os.path.abspath(self.where)}"


def load_for_eval(checkpoint: Optional[str], config: Optional[str] = None,
                  overrides: Sequence[Tuple[str, str]] = (), step: Optional[str] = None,
                  say=print, before_weights=None) -> Loaded:
  """Resolves the config and restores a checkpoint (see eval.py): a train.py workdir (its
  ``step``), one of our adapter directories, a Hugging Face PEFT adapter directory
  (``adapter_config.json``), or ``None``: the base model of ``config`` alone. Every bad
  input is one ConfigError before any compute: ``before_weights(cfg, tokenizer, default_out)``
  runs before the weights are read (eval.py checks its output directory and its data; the
  last argument is a :class:`Loaded` without the model, for its description)."""
  from peft_jax import config_lib, inputs
  from peft_jax.builder import build

  loaded = config_lib.load(config, overrides) if config else None   # bad fields first
  if checkpoint is None:
    kind, where = "base", None
  elif os.path.isfile(os.path.join(checkpoint, "adapter_config.json")) and not \
      os.path.isfile(os.path.join(checkpoint, "peft_config.json")):
    kind, where = "hf_adapter", checkpoint
  else:
    kind, where = checkpoint_kind(checkpoint)
  if kind != "workdir" and step is not None:
    raise inputs.ConfigError(f"--step={step} chooses a checkpoint of a train.py workdir, "
                             f"but {where or 'no --checkpoint'} is "
                             f"{'an adapter directory (the final step only)' if where else 'given'}"
                             "; pass the workdir as --checkpoint")
  run = None
  if kind == "workdir":
    from peft_jax.trainer import RUN_CONFIG, _read_run_config
    run = _read_run_config(where)
    if run is None:
      raise inputs.ConfigError(f"{where} has no {RUN_CONFIG} (written by train.py with its "
                               "first checkpoint); cannot tell which run made the checkpoints")
  if loaded is not None:
    cfg, notes = loaded
    if run is not None:
      _check_against_run(cfg, run["config"], where)
  elif run is not None:
    cfg, notes = config_lib.resolve(run["config"], overrides)
  else:
    what = {"base": "without --checkpoint (the base model alone)"}.get(
        kind, f"with an adapter directory ({where})")
    raise inputs.ConfigError(f"--config is required {what}")
  for n in notes:
    say(f"note: {n}")
  mc = inputs.model_config(cfg)

  step_n, chosen, recorded = None, kind, None
  if kind == "workdir":
    from peft_jax.integrity import manifest_problem
    try:
      step_n, chosen = resolve_step(where, step or "best")
    except SelectionError as e:
      raise inputs.ConfigError(str(e)) from None
    step_dir = os.path.join(where, "checkpoints", str(step_n))
    problem = manifest_problem(step_dir)      # checksums first: never evaluate damaged bytes
    if problem is not None:
      raise inputs.ConfigError(f"checkpoint step {step_n} in {where} is damaged: {problem}")
    default_out = where
  elif kind == "adapter":
    from peft_jax.peft.io import read_adapter_config, verify_adapter
    verify_adapter(where)
    recorded = read_adapter_config(where)
    default_out = os.path.dirname(os.path.abspath(where))
  elif kind == "hf_adapter":
    default_out = os.path.dirname(os.path.abspath(where))
  else:
    default_out = None
  tok = inputs.tokenizer(cfg, mc)
  if before_weights is not None:
    before_weights(cfg, tok, default_out, Loaded(
        cfg, mc, None, None, None, None, tok, kind, where, step_n, chosen, default_out))

  if kind == "workdir":
    from peft_jax.trainer import _Checkpointer
    built = build(cfg, with_weights=True)
    inputs.check_base(run.get("base"), built.base_info, f"the run in {where}")
    ckpt = _Checkpointer(where, cfg.train, read_only=True)
    params, _ = ckpt.restore_trainable(step_n, built.state, built.state.params, built.param_sh)
    state, model = built.state, built.model
  elif kind == "adapter":
    from peft_jax.peft.io import load_adapter_leaves
    # the run's setup for the adapter's own method (mesh, shardings, base weights into shards)
    built = build(cfg, peft={"method": recorded["method"], **recorded["hparams"]},
                  with_weights=True)
    inputs.check_base(recorded.get("base"), built.base_info, f"the adapter {where}")
    params = load_adapter_leaves(where, built.state, verify=False)   # verified above
    state, model = built.state, built.model
  else:
    built = build(cfg, peft={"method": "full"}, with_weights=True)   # the plain base model
    state, model, params = built.state, built.model, built.state.params
    if kind == "hf_adapter":
      from peft_jax.models import build_model
      from peft_jax.peft.hf_peft import import_hf_peft
      state, params = import_hf_peft(where, built.mc, built.state.params)
      model = build_model(built.mc, state.sites)
  return Loaded(cfg=cfg, mc=mc, built=built, state=state, model=model,
                params=state.prepare(params), tokenizer=tok, kind=kind, where=where,
                step=step_n, chosen=chosen, default_out=default_out)


def evaluate_checkpoint(checkpoint: str, config: Optional[str] = None,
                        overrides: Sequence[Tuple[str, str]] = (), step: Optional[str] = None,
                        split: Optional[str] = None, output: Optional[str] = None,
                        say=print) -> Tuple[dict, List[str]]:
  """What ``eval.py`` does without ``--suite`` (see its docstring): ``(eval.json's content,
  eval.md's lines)``. Every bad input is one ConfigError / DataError before any compute."""
  from peft_jax import inputs
  from peft_jax.evals.generation import evaluate_generation

  holder = {}

  def before_weights(cfg, tok, default_out, _):
    if default_out is None and output is None:
      raise inputs.ConfigError("--output is required when evaluating the base model alone")
    holder["out"] = inputs.writable_dir(output or default_out, "--output",
                                        "a directory for eval.json and eval.md")
    cfg.data.eval_split = split or cfg.data.get("eval_split") or "validation"
    holder["rows"] = inputs.dataset(cfg)[1]     # the rows of data.eval_split, i.e. --split

  ld = load_for_eval(checkpoint, config, overrides, step=step, say=say,
                     before_weights=before_weights)
  cfg, mc, tok, out, rows = ld.cfg, ld.mc, ld.tokenizer, holder["out"], holder["rows"]
  split = cfg.data.eval_split
  step_n, chosen, state = ld.step, ld.chosen, ld.state
  step_dir = os.path.join(ld.where, "checkpoints", str(step_n)) if ld.kind == "workdir" \
      else ld.where
  res = evaluate_generation(ld.model, ld.params, tok, mc, rows,
                            max_source_len=cfg.data.max_source_len,
                            max_new_tokens=cfg.eval.max_new_tokens,
                            batch_size=cfg.eval.batch_size, num_beams=cfg.eval.num_beams,
                            metric=cfg.eval.metric)
  metrics = {k: v for k, v in res.items() if isinstance(v, (int, float))}
  res = dict(res) | {"split": split, "step": step_n, "chosen": chosen, "checkpoint": step_dir,
                     "method": state.method.name, "metric": cfg.eval.metric,
                     "examples": len(rows)}
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump(res, f, indent=2)
  lines = [f"split: {split}; checkpoint: {step_dir}"
           + (f" (step {step_n}, {chosen})" if step_n is not None else " (adapter)"), "",
           "| metric | value |", "|---|---|"]
  lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
            for k, v in metrics.items()]
  for group in ("per_category", "per_task"):
    if group in res:   # SuperNI breakdowns
      names = sorted(next(iter(res[group].values()), {}))
      lines += ["", f"| {group[4:]} | " + " | ".join(names) + " |",
                "|---|" + "---|" * len(names)]
      lines += [f"| {k} | " + " | ".join(f"{v.get(n, 0):.4f}" for n in names) + " |"
                for k, v in sorted(res[group].items())]
  with open(os.path.join(out, "eval.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return res, lines
