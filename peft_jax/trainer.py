"""The training loop behind ``train.py``: data, steps, evaluation, checkpoints.

Readable top to bottom: build (config -> model, PEFT state, data), then a loop
that feeds prefetched, length-bucketed batches to one jitted step, logs, evaluates
and saves. Checkpoints (orbax) hold only the trainable leaves, the optimizer
state, the step and the data position; the base model is referenced by the config.
A run restarted with the same workdir resumes exactly where the last checkpoint
left it (same batches, same dropout keys: bitwise on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import queue
import threading
import time
from typing import Any, Dict, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax import run
from peft_jax import sharding as S
from peft_jax.data.batching import encode, epoch_order, make_batch
from peft_jax.evaluation import evaluate_generation
from peft_jax.metrics_log import MetricsWriter
from peft_jax.models import abstract_params, build_model
from peft_jax.peft import apply_peft, summary
from peft_jax.peft.base import flatten, split_trainable, unflatten
from peft_jax.training import make_eval_loss, make_train_step, make_tx, opt_state_shardings


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
  def __init__(self, cfg, workdir: Optional[str]):
    self.cfg, self.workdir = cfg, workdir
    tc, d = cfg.train, cfg.data
    self.mc = run.model_config(cfg)
    self.method = cfg.peft.method
    self.overrides = run.peft_overrides(cfg)
    self.main = jax.process_index() == 0     # prints, logs and files: process 0 only
    # configuration errors surface here, before any weights or data are touched
    abstract_state = apply_peft(self.mc, abstract_params(self.mc), self.method, self.overrides)
    if tc.batch_size % max(tc.get("micro_batch_size") or tc.batch_size, 1):
      raise run.ConfigError(f"train.batch_size={tc.batch_size} must be a multiple of "
                            f"train.micro_batch_size={tc.micro_batch_size}")
    self.accum = tc.batch_size // (tc.get("micro_batch_size") or tc.batch_size)
    # shapes first, then shardings (weights are created or read straight into them)
    self.mesh = run.make_mesh(cfg)
    shards = S.batch_shards(self.mesh)
    if (tc.batch_size // self.accum) % shards:
      raise run.ConfigError(
          f"the micro-batch ({tc.batch_size // self.accum} rows) must split evenly over the "
          f"mesh's data x fsdp = {shards} devices (mesh {dict(self.mesh.shape)}); change "
          "train.micro_batch_size, or config.mesh (tensor > 1, or num_devices)")
    m = cfg.get("mesh") or {}
    try:
      self.rules = S.parse_rules(m.get("rules"))
      specs, dropped = S.param_specs(self.mc, abstract_state.params, self.mesh, self.rules,
                                     m.get("param_rules"), added=abstract_state.added)
    except S.ShardingError as e:
      raise run.ConfigError(f"config.mesh: {e}") from None
    self.param_sh = unflatten({k: S.NamedSharding(self.mesh, v) for k, v in specs.items()})
    base_paths = set(flatten(abstract_params(self.mc)))
    base_sh = unflatten({k: v for k, v in flatten(self.param_sh).items() if k in base_paths})
    self.batch_sh = S.batch_sharding(self.mesh)
    self.rows = S.local_rows(self.batch_sh, tc.batch_size)
    if self.main:
      print(S.describe(self.mesh, specs, dropped, flatten(abstract_state.params)))
      print(f"process {jax.process_index()} of {jax.process_count()} builds rows "
            f"{self.rows[0]}:{self.rows[1]} of each batch of {tc.batch_size}")
    self.tok = run.tokenizer(cfg, self.mc)
    self.train_rows, self.val_rows = run.dataset(cfg)
    self.layout = run.layout(self.mc)
    self.pad, self.start = run.start_and_pad(self.mc, self.tok)
    self.enc = encode(self.tok, self.train_rows, d.max_source_len, d.max_target_len,
                      source_eos=self.layout == "seq2seq")
    # conversations (TULU): the whole chat, loss on every assistant turn (open-instruct)
    self.chat = None
    if self.layout == "causal" and all("messages" in r for r in self.train_rows):
      from peft_jax.data.tulu import tokenize_rows
      self.chat = list(tokenize_rows(self.tok, self.train_rows,
                                     max_length=d.max_source_len + d.max_target_len))
    self.val_enc = encode(self.tok, self.val_rows, d.max_source_len, d.max_target_len,
                          source_eos=self.layout == "seq2seq")
    self.n_train = len(self.chat) if self.chat is not None else len(self.enc.source)
    self.steps_per_epoch = max(self.n_train // tc.batch_size, 1)
    self.total = tc.num_steps if tc.num_steps > 0 else max(1, tc.num_epochs) * self.steps_per_epoch
    self.total = max(self.total, int(tc.get("min_steps") or 0))
    if not cfg.model.get("checkpoint") and self.main:
      print(f"note: no model.checkpoint given: {self.mc.model_type} preset "
            f"{cfg.model.get('name')!r} starts from random weights")
    self.rng = jax.random.PRNGKey(tc.seed)

    base = run.base_params(cfg, self.mc, jax.random.fold_in(self.rng, 0), shardings=base_sh)
    state = apply_peft(self.mc, base, self.method, self.overrides,
                       rng=jax.random.fold_in(self.rng, 1))
    self.state = dataclasses.replace(state, params=S.put_tree(state.params, self.param_sh))
    self.model = build_model(self.mc, self.state.sites)
    from ml_collections import ConfigDict
    tx = make_tx(ConfigDict(tc.to_dict() | {"total_steps": self.total}), self.state.params)
    self.opt, self.step_fn = make_train_step(self.state, self.model, tx, accum_steps=self.accum,
                                             mesh=self.mesh, param_shardings=self.param_sh,
                                             rules=self.rules)
    self.opt_sh = opt_state_shardings(self.opt, self.state.params, self.param_sh, self.mesh)
    self.eval_loss_fn = make_eval_loss(self.state, self.model, self.mesh, self.param_sh)
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
        yield epoch, i, host, S.global_batch(host, self.batch_sh, tc.batch_size)
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
      host = {k: S.gather(v) for k, v in tr.items()}     # collective: every process joins
      if self.main:
        save_adapter(self.state, unflatten({**fr, **host}),
                     os.path.join(self.workdir, "adapter"))
    self.writer.close()
    self.params = params
    return {"untuned": None if untuned is None else untuned[metric], "tuned": final[metric],
            "eval_loss": final["eval_loss"], "steps": step, "metric": metric,
            "best_step": best["step"], "best": best[metric]}

  def _lr(self, step):
    from peft_jax.training import make_schedule
    from ml_collections import ConfigDict
    if not hasattr(self, "_sched"):
      self._sched = make_schedule(ConfigDict(self.cfg.train.to_dict() | {"total_steps": self.total}))
    return self._sched(step)


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
      raise run.ConfigError(f"checkpoint {self.directory}/{step} does not match this run's "
                            f"model and method ({type(e).__name__}: {str(e)[:300]}); use another "
                            "--workdir or the config the checkpoint was written with") from None
    if got["meta"].get("method") != state.method.name:
      raise run.ConfigError(f"checkpoint {self.directory}/{step} was written by method "
                            f"{got['meta'].get('method')!r}, this run uses {state.method.name!r}")
    restored = flatten(got["trainable"])
    params = unflatten({**fr, **restored})
    return params, got["opt_state"], got["meta"]
