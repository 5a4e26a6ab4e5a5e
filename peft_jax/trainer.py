"""The training loop behind ``train.py``: data, steps, evaluation, checkpoints.

Readable top to bottom: build (config -> model, PEFT state, data), then a loop
that feeds prefetched, length-bucketed batches to one jitted step, logs, evaluates
and saves. Checkpoints (orbax) hold only the trainable leaves, the optimizer
state, the step and the data position; the base model is referenced by the config.
A run restarted with the same workdir resumes exactly where the last checkpoint
left it (same batches, same dropout keys: bitwise on CPU).
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from typing import Any, Dict, Iterator, Optional, Sequence

import jax

from peft_jax import inputs
from peft_jax import sharding
from peft_jax.data.batching import encode, epoch_order, make_batch
from peft_jax.evals.generation import evaluate_generation
from peft_jax.metrics_log import MetricsWriter
from peft_jax.builder import build
from peft_jax.models import family_of
from peft_jax.peft import summary
from peft_jax.peft.base import flatten, split_trainable, unflatten


class TrainingDiverged(RuntimeError):
  """A non-finite loss; the message names the step."""


def _prefetch(it: Iterator, size: int = 2) -> Iterator:
  """Produces host batches on a thread so the next one is ready while the device computes."""
  q: "queue.Queue" = queue.Queue(maxsize=size)
  done = object()

  def worker():
    try:
      for x in it:
        q.put(x)
    except BaseException as e:  # re-raised in the consumer, never a silent hang
      q.put(_Failed(e))
      return
    q.put(done)

  threading.Thread(target=worker, daemon=True).start()
  while True:
    x = q.get()
    if x is done:
      return
    if isinstance(x, _Failed):
      raise x.error
    yield x


class _Failed:
  def __init__(self, error):
    self.error = error


class Trainer:
  def __init__(self, cfg, workdir: Optional[str], allow_changed: Sequence[str] = ()):
    from peft_jax.config_lib import resolve
    cfg, _ = resolve(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)   # every field, checked
    self.cfg, self.workdir = cfg, workdir
    self.resuming = bool(workdir) and _has_checkpoint(workdir)
    self.recorded = _read_run_config(workdir) if self.resuming else None
    if self.recorded is not None:
      check_resume_config(self.recorded.get("config", {}), cfg.to_dict(), allow_changed, workdir)
    tc, d = cfg.train, cfg.data
    self.main = jax.process_index() == 0     # prints, logs and files: process 0 only
    # shapes and shardings first: configuration errors surface here, before weights or data
    spec = build(cfg)
    self.mc, self.mesh, self.rules, self.accum = spec.mc, spec.mesh, spec.rules, spec.accum
    self.batch_sh = spec.batch_sh
    self.rows = sharding.local_rows(self.batch_sh, tc.batch_size)
    if self.main:
      print(spec.describe_mesh())
      print(f"process {jax.process_index()} of {jax.process_count()} builds rows "
            f"{self.rows[0]}:{self.rows[1]} of each batch of {tc.batch_size}")
    self.tok = inputs.tokenizer(cfg, self.mc)
    self.train_rows, self.val_rows = inputs.dataset(cfg)
    self.layout = inputs.layout(self.mc)
    self.pad, self.start = inputs.start_and_pad(self.mc, self.tok)
    source_eos = family_of(self.mc).source_eos
    self.enc = encode(self.tok, self.train_rows, d.max_source_len, d.max_target_len,
                      source_eos=source_eos)
    # conversations (TULU): the whole chat, loss on every assistant turn (open-instruct)
    self.chat = None
    if self.layout == "causal" and all("messages" in r for r in self.train_rows):
      from peft_jax.data.tulu import tokenize_rows
      self.chat = list(tokenize_rows(self.tok, self.train_rows,
                                     max_length=d.max_source_len + d.max_target_len))
    self.val_enc = encode(self.tok, self.val_rows, d.max_source_len, d.max_target_len,
                          source_eos=source_eos)
    self.n_train = len(self.chat) if self.chat is not None else len(self.enc.source)
    self.steps_per_epoch = max(self.n_train // tc.batch_size, 1)
    self.total = tc.num_steps if tc.num_steps > 0 else max(1, tc.num_epochs) * self.steps_per_epoch
    self.total = max(self.total, int(tc.get("min_steps") or 0))
    if not cfg.model.get("checkpoint") and self.main:
      print(f"note: no model.checkpoint given: {self.mc.model_type} preset "
            f"{cfg.model.get('name')!r} starts from random weights")
    self.rng = jax.random.PRNGKey(tc.seed)

    # then the weights, straight into their shards
    self.built = spec.with_weights()
    self.state, self.model, self.param_sh = self.built.state, self.built.model, spec.param_sh
    self.base_info = self.built.base_info
    if self.recorded is not None:
      inputs.check_base(self.recorded.get("base"), self.base_info, f"the run in {workdir}")
    if workdir and self.main:
      _write_run_config(workdir, cfg, self.base_info)
    self.opt, self.step_fn, self.opt_sh = self.built.train_step(self.total)
    self.eval_loss_fn = self.built.eval_loss()
    self.writer = MetricsWriter(workdir)
    self.ckpt = _Checkpointer(workdir, tc) if workdir else None

  # ------------------------------------------------------------------ data
  def batches(self, epoch: int, start: int) -> Iterator[Any]:
    """``(epoch, index, host rows, global device batch)``: every process walks the same
    order but builds only its rows (``self.rows``), padded to the global batch's bucket."""
    tc, d = self.cfg.train, self.cfg.data
    lo, hi = self.rows
    while True:
      order = epoch_order(self.n_train, tc.seed, epoch)
      for i in range(start, self.steps_per_epoch):
        idx = order[i * tc.batch_size:(i + 1) * tc.batch_size]
        if self.chat is not None:
          from peft_jax.data.tulu import chat_batch
          host = chat_batch(self.chat, idx[lo:hi], self.pad, d.max_source_len + d.max_target_len,
                            batch_size=hi - lo, lengths_from=idx)
        else:
          host = make_batch(self.enc, idx[lo:hi], self.layout, self.pad, self.start,
                            d.max_source_len, d.max_target_len, batch_size=hi - lo,
                            lengths_from=idx)
        yield epoch, i, host, sharding.global_batch(host, self.batch_sh, tc.batch_size)
      epoch, start = epoch + 1, 0

  # ------------------------------------------------------------------ evaluation
  def evaluate(self, params) -> Dict[str, Any]:
    ec, d = self.cfg.eval, self.cfg.data
    prepared = self.state.prepare(params)
    out = evaluate_generation(self.model, prepared, self.tok, self.mc, self.val_rows,
                              max_source_len=d.max_source_len, max_new_tokens=ec.max_new_tokens,
                              batch_size=ec.batch_size, num_beams=ec.num_beams,
                              metric=ec.metric)
    tot = n = 0.0
    for i in range(0, len(self.val_enc.source), ec.batch_size):
      idx = list(range(i, min(i + ec.batch_size, len(self.val_enc.source))))
      b = make_batch(self.val_enc, idx, self.layout, self.pad, self.start, d.max_source_len,
                     d.max_target_len, batch_size=ec.batch_size)
      t, m = self.eval_loss_fn(params, b)
      tot, n = tot + float(t), n + float(m)
    out["eval_loss"] = tot / max(n, 1.0)
    return out

  # ------------------------------------------------------------------ loop
  def train(self) -> Dict[str, Any]:
    from tqdm import tqdm
    tc, metric = self.cfg.train, self.cfg.eval.metric
    say = print if self.main else (lambda *a, **k: None)
    params = self.state.params
    opt_state = jax.jit(self.opt.init, out_shardings=self.opt_sh)(params)
    step, epoch, pos = 0, 0, 0
    if self.ckpt and self.ckpt.latest() is not None:
      params, opt_state, meta = self.ckpt.restore(self.state, params, opt_state, self.param_sh,
                                                  self.opt_sh)
      step, epoch, pos = meta["step"], meta["epoch"], meta["pos"]
      say(f"resumed from {self.ckpt.directory} at step {step}")
    say(summary(self.state)["table"])

    untuned = self.evaluate(params) if step == 0 and tc.get("eval_at_start", True) else None
    if untuned is not None:
      say(f"untuned {metric}: {untuned[metric]:.4f}")
      self.writer.write(0, _scalars("eval", untuned))
    best = {"step": None, metric: -math.inf, "eval_loss": math.inf}
    patience, bad_evals, best_loss = tc.get("early_stopping_patience") or 0, 0, math.inf
    t0, tokens = time.time(), 0
    bar = tqdm(total=self.total, initial=step, desc="train", dynamic_ncols=True, mininterval=1.0,
               disable=not self.main)
    it = _prefetch(self.batches(epoch, pos))
    last = None
    while step < self.total:
      ep, i, host, batch = next(it)
      params, opt_state, m = self.step_fn(params, opt_state, batch,
                                          jax.random.fold_in(self.rng, 1000 + step))
      step += 1
      epoch, pos = (ep, i + 1) if i + 1 < self.steps_per_epoch else (ep + 1, 0)
      # this host's rows, times the hosts (an estimate of the global count)
      tokens += (int(host["input_mask"].sum()) + int(host["target_mask"].sum())) * \
          jax.process_count()
      if last is not None and not bool(last["finite"]):   # one step behind: no sync per step
        raise TrainingDiverged(f"non-finite loss at step {step - 1}; the run stops and keeps its "
                               f"last good checkpoint (lower train.learning_rate or set "
                               f"train.grad_clip)")
      last = m
      if step % tc.log_every == 0 or step == self.total:
        if not bool(m["finite"]):
          raise TrainingDiverged(f"non-finite loss at step {step}; the run stops and keeps its "
                                 "last good checkpoint (lower train.learning_rate or set "
                                 "train.grad_clip)")
        loss = float(m["loss"])
        tps = tokens / max(time.time() - t0, 1e-9)
        lr = float(self._lr(step))
        self.writer.write(step, {"train/loss": loss, "train/grad_norm": float(m["grad_norm"]),
                                 "train/learning_rate": lr, "train/tokens_per_s": tps})
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:.0f}")
      bar.update(1)
      evaluate_now = tc.eval_every and step % tc.eval_every == 0 and step < self.total
      if evaluate_now:
        res = self.evaluate(params)
        self.writer.write(step, _scalars("eval", res))
        if res["eval_loss"] < best_loss:       # early stopping watches the validation loss
          best_loss, bad_evals = res["eval_loss"], 0
        else:
          bad_evals += 1
        if res[metric] > best[metric]:
          best = {"step": step, metric: res[metric], "eval_loss": res["eval_loss"]}
        if self.ckpt:
          self.ckpt.save(step, self.state, params, opt_state, epoch, pos, res[metric])
        if patience and bad_evals >= patience:
          say(f"early stopping at step {step}: validation loss has not improved for "
                f"{patience} evaluations")
          break
      elif self.ckpt and tc.save_every and step % tc.save_every == 0:
        self.ckpt.save(step, self.state, params, opt_state, epoch, pos, None)
      if tc.get("stop_at_step") and step >= tc.stop_at_step and step < self.total:
        # an interruption drill: stop as a preempted job would, after the last save
        bar.close()
        if self.ckpt:
          self.ckpt.wait()
        self.params = params
        return {"interrupted_at": step, "steps": step, "metric": metric, "untuned": None,
                "tuned": None}
    bar.close()
    if last is not None and not bool(last["finite"]):
      raise TrainingDiverged(f"non-finite loss at step {step}; the run stops and keeps its last "
                             "good checkpoint")
    final = self.evaluate(params)
    self.writer.write(step, _scalars("eval", final))
    if final[metric] > best[metric]:
      best = {"step": step, metric: final[metric], "eval_loss": final["eval_loss"]}
    if self.ckpt:
      self.ckpt.save(step, self.state, params, opt_state, epoch, pos, final[metric], force=True)
      self.ckpt.wait()
      from peft_jax.peft import save_adapter
      tr, fr = split_trainable(params, self.state.trainable)
      host = {k: sharding.gather(v) for k, v in tr.items()}     # collective: every process joins
      if self.main:
        save_adapter(self.state, unflatten({**fr, **host}),
                     os.path.join(self.workdir, "adapter"), base=self.base_info)
    self.writer.close()
    self.params = params
    return {"untuned": None if untuned is None else untuned[metric], "tuned": final[metric],
            "eval_loss": final["eval_loss"], "steps": step, "metric": metric,
            "best_step": best["step"], "best": best[metric]}

  def _lr(self, step):
    from peft_jax.step import make_schedule
    from ml_collections import ConfigDict
    if not hasattr(self, "_sched"):
      self._sched = make_schedule(ConfigDict(self.cfg.train.to_dict() | {"total_steps": self.total}))
    return self._sched(step)


RUN_CONFIG = "config.json"
#: what a resumed run must share with the run that wrote the checkpoints (sections, or
#: section.field); the rest (logging, evaluation, checkpoint cadence, mesh) may change
RESUME_FIXED = ("tokenizer", "model", "peft", "data", "train.batch_size", "train.num_steps",
                "train.num_epochs", "train.min_steps", "train.learning_rate", "train.schedule",
                "train.warmup_ratio", "train.warmup_steps", "train.init_learning_rate",
                "train.end_learning_rate", "train.weight_decay", "train.grad_clip", "train.seed")


def _has_checkpoint(workdir: str) -> bool:
  d = os.path.join(workdir, "checkpoints")
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def _read_run_config(workdir: str) -> Optional[dict]:
  p = os.path.join(workdir, RUN_CONFIG)
  if not os.path.isfile(p):
    return None
  try:
    with open(p) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise inputs.ConfigError(f"{p} is unreadable ({type(e).__name__}: {e}); it records the "
                          "config of the checkpoints in that workdir") from None


def _write_run_config(workdir: str, cfg, base_info: dict) -> None:
  os.makedirs(workdir, exist_ok=True)
  tmp = os.path.join(workdir, RUN_CONFIG + ".tmp")
  with open(tmp, "w") as f:
    json.dump({"config": cfg.to_dict(), "base": base_info}, f, indent=2, default=list)
  os.replace(tmp, os.path.join(workdir, RUN_CONFIG))


def _flat_config(d: dict, prefix: str = "") -> Dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flat_config(v, key + "."))
    else:
      out[key] = list(v) if isinstance(v, tuple) else v
  return out


def check_resume_config(old: dict, new: dict, allow_changed: Sequence[str], workdir: str) -> None:
  """One :class:`run.ConfigError` line naming the fields that differ from the config the
  workdir's checkpoints were written with (fields in ``allow_changed`` may differ)."""
  fo, fn = _flat_config(old), _flat_config(new)
  fixed = lambda k: any(k == f or k.startswith(f + ".") for f in RESUME_FIXED)  # noqa: E731
  first = ("peft.method", "data.name", "model.name", "model.checkpoint")   # the root causes
  changed = sorted((k for k in set(fo) | set(fn)
                    if fixed(k) and fo.get(k) != fn.get(k) and k not in allow_changed),
                   key=lambda k: (k not in first, k))
  if changed:
    shown = "; ".join(f"{k}: {fo.get(k)!r} -> {fn.get(k)!r}" for k in changed[:4])
    more = f" (+{len(changed) - 4} more)" if len(changed) > 4 else ""
    raise inputs.ConfigError(
        f"{workdir} holds checkpoints of a run with another config: {shown}{more}; rerun with "
        f"the same config, use another --workdir, or allow a change explicitly "
        f"(--allow_changed={changed[0]})")


def _scalars(prefix, res):
  return {f"{prefix}/{k}": v for k, v in res.items() if isinstance(v, (int, float))}


class _Checkpointer:
  """Orbax: trainable leaves + optimizer state + step/data position; keeps the last
  ``train.keep_last`` and the best (by the validation metric)."""

  def __init__(self, workdir, tc):
    import orbax.checkpoint as ocp
    self.ocp = ocp
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    cm = ocp.checkpoint_managers
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=max(int(tc.get("keep_last") or 2), 1)),
        cm.BestN(get_metric_fn=lambda m: m["metric"], reverse=False, n=1,
                 keep_checkpoints_without_metrics=False)])
    self.mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(preservation_policy=policy,
                                                             enable_async_checkpointing=False))

  def latest(self):
    return self.mngr.latest_step()

  def save(self, step, state, params, opt_state, epoch, pos, metric, force=False):
    if self.mngr.latest_step() == step:
      return
    tr, _ = split_trainable(params, state.trainable)
    ocp = self.ocp
    args = ocp.args.Composite(
        trainable=ocp.args.StandardSave(unflatten(tr)),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave({"step": step, "epoch": epoch, "pos": pos,
                                "method": state.method.name}))
    self.mngr.save(step, args=args, metrics=None if metric is None else {"metric": float(metric)},
                   force=force)

  def wait(self):
    self.mngr.wait_until_finished()

  def restore(self, state, params, opt_state, param_sh, opt_sh):
    """Into this run's shardings, whatever mesh wrote the checkpoint."""
    ocp = self.ocp
    step = self.mngr.latest_step()
    tr, fr = split_trainable(params, state.trainable)
    fsh = flatten(param_sh)
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    abstract_tr = unflatten({k: sds(v, fsh[k]) for k, v in tr.items()})
    abstract_opt = jax.tree_util.tree_map(sds, opt_state, opt_sh)
    try:
      got = self.mngr.restore(step, args=ocp.args.Composite(
          trainable=ocp.args.StandardRestore(abstract_tr),
          opt_state=ocp.args.StandardRestore(abstract_opt),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises several types for structure/shape mismatches
      raise inputs.ConfigError(f"checkpoint {self.directory}/{step} does not match this run's "
                            f"model and method ({type(e).__name__}: {str(e)[:300]}); use another "
                            "--workdir or the config the checkpoint was written with") from None
    if got["meta"].get("method") != state.method.name:
      raise inputs.ConfigError(f"checkpoint {self.directory}/{step} was written by method "
                            f"{got['meta'].get('method')!r}, this run uses {state.method.name!r}")
    restored = flatten(got["trainable"])
    params = unflatten({**fr, **restored})
    return params, got["opt_state"], got["meta"]
