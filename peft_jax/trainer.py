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
import sys
import threading
import time
from typing import Any, Dict, Iterator, Optional, Sequence

import jax

from peft_jax import inputs
from peft_jax import sharding
from peft_jax.data.batching import encode, epoch_order, make_batch
from peft_jax.evals.generation import evaluate_generation
from peft_jax.integrity import fault
from peft_jax.metrics_log import MetricsWriter
from peft_jax.builder import build
from peft_jax.models import family_of
from peft_jax.peft import summary
from peft_jax.peft.base import flatten, split_trainable, unflatten
from peft_jax.selection import Selection


class TrainingDiverged(RuntimeError):
  """A non-finite loss or state; the message names the step and the last good checkpoint."""


class Interrupted(RuntimeError):
  """SIGINT/SIGTERM: the run saved a checkpoint at the step it had reached and stopped."""

  def __init__(self, step: int):
    super().__init__(f"interrupted at step {step}; rerun the same command to resume")
    self.step = step


EXIT_INTERRUPTED = 130


class _Signals:
  """SIGINT and SIGTERM (what preemption sends) ask the loop to stop after the current step;
  a second signal exits at once. Installed only in the main thread."""

  def __init__(self, say):
    self.received, self.say, self.old = None, say, {}

  def __enter__(self):
    import signal
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self.old[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    import signal
    if self.received is not None:
      print(f"\n{signal.Signals(signum).name} again: exiting now, without saving", flush=True)
      os._exit(EXIT_INTERRUPTED)
    self.received = signum
    self.say(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
             "(send it again to exit at once)")

  def __exit__(self, *exc):
    import signal
    for sig, h in self.old.items():
      signal.signal(sig, h)
    return False


def _finite_tree(tree):
  """True when every float leaf of ``tree`` is finite (one device reduction)."""
  import jax.numpy as jnp
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
  out = jnp.asarray(True)
  for x in leaves:
    out = out & jnp.all(jnp.isfinite(x))
  return out


def _prefetch(it: Iterator, size: int = 2) -> Iterator:
  """Produces host batches on a thread so the next one is ready while the device computes.
  Closing the returned generator (or dropping it) stops the thread, which then releases
  ``it`` and everything it holds (the batch source is endless)."""
  q: "queue.Queue" = queue.Queue(maxsize=size)
  stop = threading.Event()
  done = object()

  def put(x) -> bool:
    while not stop.is_set():
      try:
        q.put(x, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def worker():
    try:
      for x in it:
        if not put(x):
          return
    except BaseException as e:  # re-raised in the consumer, never a silent hang
      put(_Failed(e))
      return
    put(done)

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  try:
    while True:
      x = q.get()
      if x is done:
        return
      if isinstance(x, _Failed):
        raise x.error
      yield x
  finally:
    stop.set()
    # wait for it: a thread still freeing device arrays while the interpreter exits aborts
    thread.join(timeout=60)


class _Failed:
  def __init__(self, error):
    self.error = error


class _StepClock:
  """``train_seconds``: wall time of training steps in steady state. The clock runs across
  the loop (batch assembly, the step, logging) and stops, after waiting for the pending
  steps (``block_until_ready`` on the parameters), before every evaluation and checkpoint
  save and before a step whose batch shapes are new: that step compiles (the first step,
  and the first of each new length bucket), is waited for and not timed. The clock starts
  again at the next step with known shapes. ``train_seconds`` is the mean timed step time
  times every step of the run (untimed compiling steps count at the steady rate); ``None``
  when no step was timed. Only those stops synchronise; the steps between stay async.

  The timed steps' tokens give the steady-state rate: :meth:`window_rate` since its last
  call (the logged ``train/tokens_per_s``; call it after a synchronisation such as reading
  a step's loss, so that the steps it counts are done) and :meth:`tokens_per_s` over the
  run. ``compile_seconds``: the compiling steps' wall time (tracing, compiling or loading
  from the persistent cache, and running once)."""

  def __init__(self):
    self.shapes, self.seconds, self.steps, self.t = set(), 0.0, 0, None
    self.tokens, self.compile_seconds, self._compile_t = 0, 0.0, None
    self._window = (0.0, 0)        # (seconds, tokens) at the last window_rate

  def step_begins(self, batch, params) -> bool:
    """Whether this step compiles (new batch shapes); starts the clock if it does not."""
    sig = tuple(sorted((k, tuple(getattr(v, "shape", ()))) for k, v in batch.items()))
    if sig in self.shapes:
      if self.t is None:
        self.t = time.perf_counter()
      return False
    self.shapes.add(sig)
    self.stop(params)
    self._compile_t = time.perf_counter()
    return True

  def step_ends(self, params, compiled: bool, tokens: int = 0):
    if compiled:
      jax.block_until_ready(params)    # the compiling step finishes outside the clock
      self.compile_seconds += time.perf_counter() - self._compile_t
    else:
      self.steps += 1
      self.tokens += tokens

  def stop(self, params):
    if self.t is not None:
      jax.block_until_ready(params)
      self.seconds += time.perf_counter() - self.t
      self.t = None

  def elapsed(self) -> float:
    """Timed seconds so far, the running interval included (no synchronisation)."""
    return self.seconds + (time.perf_counter() - self.t if self.t is not None else 0.0)

  def window_rate(self) -> Optional[float]:
    """Tokens per second of the timed steps since the last call; ``None`` when none was
    timed since (then the window carries over)."""
    secs, toks = self.elapsed(), self.tokens
    s0, t0 = self._window
    if toks == t0 or secs <= s0:
      return None
    self._window = (secs, toks)
    return (toks - t0) / (secs - s0)

  def tokens_per_s(self) -> Optional[float]:
    return round(self.tokens / self.seconds, 1) if self.seconds > 0 and self.tokens else None

  def train_seconds(self, steps: int) -> Optional[float]:
    return round(self.seconds / self.steps * steps, 4) if self.steps else None


class _StepKeys:
  """Step ``s``'s dropout key, ``fold_in(rng, 1000 + s)`` (bitwise), as a host array.
  The keys are computed on the device a block of steps at a time, in one small jitted
  call; an eager ``fold_in`` per step is a dispatch of its own (about 0.45 ms on CPU,
  5-16% of a quickstart step), a host array rides along with the step's arguments."""

  BLOCK = 1024

  def __init__(self, rng, offset: int = 1000):
    import jax.numpy as jnp
    self.rng, self.offset, self.first, self.keys = rng, offset, None, None
    n = self.BLOCK
    self._fold = jax.jit(
        lambda key, first: jax.vmap(lambda s: jax.random.fold_in(key, s))(first + jnp.arange(n)))

  def __call__(self, step: int):
    import numpy as np
    first = step - step % self.BLOCK
    if first != self.first:
      self.keys = np.asarray(self._fold(self.rng, np.int32(self.offset + first)))
      self.first = first
    return self.keys[step - first]


class _Phase:
  """The progress bar's label: what the run is doing (``compiling``, ``train``,
  ``evaluating``, ``saving``); the bar is redrawn only when it changes."""

  def __init__(self, bar):
    self.bar, self.now = bar, None

  def __call__(self, name: str):
    if name != self.now:
      self.now = name
      self.bar.set_description(name)


class Trainer:
  def __init__(self, cfg, workdir: Optional[str], allow_changed: Sequence[str] = ()):
    from peft_jax.config_lib import resolve
    cfg, _ = resolve(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)   # every field, checked
    self.cfg, self.workdir = cfg, workdir
    self.main = jax.process_index() == 0     # prints, logs and files: process 0 only
    if workdir:
      _prepare_workdir(workdir, self.main)
    self.resuming = bool(workdir) and _has_checkpoint(workdir)
    self.recorded = _read_run_config(workdir) if self.resuming else None
    if self.recorded is not None:
      check_resume_config(self.recorded.get("config", {}), cfg.to_dict(), allow_changed, workdir)
    tc, d = cfg.train, cfg.data
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
    self._warn_about_data()
    # every example each epoch: the last, partial batch is padded with zero-weight rows
    per_epoch = self.n_train // tc.batch_size if tc.get("drop_last") else \
        -(-self.n_train // tc.batch_size)
    self.steps_per_epoch = max(per_epoch, 1)
    self.total = tc.num_steps if tc.num_steps > 0 else max(1, tc.num_epochs) * self.steps_per_epoch
    self.total = max(self.total, int(tc.get("min_steps") or 0))
    if not cfg.model.get("checkpoint") and self.main:
      print(f"note: no model.checkpoint given: {self.mc.model_type} preset "
            f"{cfg.model.get('name')!r} starts from random weights")
    self.rng = jax.random.PRNGKey(tc.seed)
    # packing (peft_jax/data/packing.py): the batch's examples in fewer rows, rows a multiple
    # of the devices the batch is split over (and of the micro-batch once above it)
    self.micro, self.shards = spec.micro_batch, sharding.batch_shards(self.mesh)
    self._row_spans = {tc.batch_size: self.rows}
    self.pack, why = self._decide_packing(spec.state.sites)
    if self.main and why:
      print(why)

    # then the weights, straight into their shards
    self.built = spec.with_weights()
    self.state, self.model, self.param_sh = self.built.state, self.built.model, spec.param_sh
    self.base_info = self.built.base_info
    if self.recorded is not None:
      inputs.check_base(self.recorded.get("base"), self.base_info, f"the run in {workdir}")
    # config.json describes the workdir's checkpoints: a fresh run writes it now, a resumed
    # one when it saves its first checkpoint (a resume that diverges changes nothing)
    self._config_pending = bool(workdir) and self.main
    if workdir and self.main and not self.resuming:
      _write_run_config(workdir, cfg, self.base_info)
      self._config_pending = False
    self.opt, self.step_fn, self.opt_sh = self.built.train_step(self.total)
    self.eval_loss_fn = self.built.eval_loss()
    # which checkpoint is best on validation (<workdir>/selection.json; peft_jax/selection.py)
    self.selection = Selection(workdir, cfg.eval.metric, cfg.data.get("eval_split") or "validation",
                               write=self.main)
    self.ckpt = _Checkpointer(workdir, tc, say=print if self.main else None,
                              selection=self.selection) if workdir else None
    self.writer = None          # opened by train(), which knows the step it resumes from
    self._saveable = jax.jit(lambda tr, opt: _finite_tree(tr) & _finite_tree(opt))

  # ------------------------------------------------------------------ data
  def _warn_about_data(self):
    """One line each: many truncated examples, fewer examples than one batch."""
    d, tc = self.cfg.data, self.cfg.train
    for what, enc in (("training", self.enc), ("evaluation", self.val_enc)):
      n = max(len(enc.source), 1)
      for part, cut, knob in (("inputs", enc.truncated_sources, "max_source_len"),
                              ("targets", enc.truncated_targets, "max_target_len")):
        if self.chat is None or what == "evaluation":
          if cut > 0.1 * n:
            inputs.warn(f"{cut} of {n} {what} {part} ({100 * cut / n:.0f}%) are longer than "
                        f"data.{knob}={d[knob]} tokens and are truncated")
    if self.n_train < tc.batch_size:
      inputs.warn(f"the training set has {self.n_train} example(s), fewer than one batch "
                  f"(train.batch_size={tc.batch_size}); each step repeats them with padding rows")

  def batches(self, epoch: int, start: int) -> Iterator[Any]:
    """``(epoch, index, host rows, global device batch)``: every process walks the same
    order but builds only its rows (``self.rows``), padded to the global batch's bucket.
    Packed (``self.pack``): every process packs the whole batch the same way and keeps its
    rows of the packed batch. A pure function of (seed, epoch, index), as without packing."""
    tc = self.cfg.train
    lo, hi = self.rows
    while True:
      order = epoch_order(self.n_train, tc.seed, epoch)
      for i in range(start, self.steps_per_epoch):
        idx = order[i * tc.batch_size:(i + 1) * tc.batch_size]
        if self.pack:
          from peft_jax.data.packing import pack_batch
          packed = pack_batch(self._host_batch(idx, 0, tc.batch_size), self.micro, self.shards,
                              self.pad)
          rows = packed["inputs"].shape[0]
          a, b = self._rows_of(rows)
          host = {k: v[a:b] for k, v in packed.items()}
          yield epoch, i, host, sharding.global_batch(host, self.batch_sh, rows)
          continue
        host = self._host_batch(idx, lo, hi)
        yield epoch, i, host, sharding.global_batch(host, self.batch_sh, tc.batch_size)
      epoch, start = epoch + 1, 0

  def _host_batch(self, idx, lo: int, hi: int) -> Dict[str, Any]:
    """Rows ``lo:hi`` of the unpacked batch of examples ``idx`` (bucketed by all of them)."""
    d = self.cfg.data
    if self.chat is not None:
      from peft_jax.data.tulu import chat_batch
      return chat_batch(self.chat, idx[lo:hi], self.pad, d.max_source_len + d.max_target_len,
                        batch_size=hi - lo, lengths_from=idx)
    return make_batch(self.enc, idx[lo:hi], self.layout, self.pad, self.start,
                      d.max_source_len, d.max_target_len, batch_size=hi - lo, lengths_from=idx)

  def _rows_of(self, rows: int):
    """This process's rows of a global batch of ``rows`` rows."""
    if rows not in self._row_spans:
      self._row_spans[rows] = sharding.local_rows(self.batch_sh, rows)
    return self._row_spans[rows]

  def _decide_packing(self, sites):
    """``(pack, note)`` for ``data.pack`` (peft_jax/data/packing.py): ``auto`` packs when the
    method allows it and the packed form of epoch 0's first batches keeps at most
    ``AUTO_MAX_FRACTION`` of their unpacked tokens."""
    from peft_jax.data import packing
    tc, pack = self.cfg.train, self.cfg.data.get("pack", "auto")
    if pack is False:
      return False, None
    if pack is True:       # a method that cannot be packed failed in build()
      return True, "data.pack=true: training batches are packed"
    problem = packing.packing_problem(sites)
    if problem:
      return False, f"data.pack=auto: training batches are not packed: {self.cfg.peft.method}: {problem}"
    order = epoch_order(self.n_train, tc.seed, 0)
    n = min(self.steps_per_epoch, packing.AUTO_BATCHES)
    before = after = 0
    for i in range(n):
      b = self._host_batch(order[i * tc.batch_size:(i + 1) * tc.batch_size], 0, tc.batch_size)
      _, rows = packing.plan(b, self.micro, self.shards)
      before += packing.tokens(b)
      after += packing.tokens(b) * rows // tc.batch_size
    frac = after / max(before, 1)
    on = frac <= packing.AUTO_MAX_FRACTION
    return on, (f"data.pack=auto: training batches are {'' if on else 'not '}packed (packing "
                f"epoch 0's first {n} batches leaves {frac:.0%} of their tokens)")

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
    """Runs to ``total`` steps (or an interrupt, or early stopping) and evaluates. Saves:
    every ``save_every`` / ``eval_every`` steps, else at the end of every epoch; on
    SIGINT/SIGTERM; and the final checkpoint and adapter before the final evaluation."""
    try:
      with _Signals(print if self.main else (lambda *a, **k: None)) as signals:
        return self._train(signals)
    finally:
      if self.writer is not None:
        self.writer.close()
      if self.workdir and self.main:
        from peft_jax.integrity import release_lock
        release_lock(self.workdir)

  def _train(self, signals) -> Dict[str, Any]:
    from tqdm import tqdm
    tc, metric = self.cfg.train, self.cfg.eval.metric
    say = print if self.main else (lambda *a, **k: None)
    params = self.state.params
    opt_state = jax.jit(self.opt.init, out_shardings=self.opt_sh)(params)
    step, epoch, pos = 0, 0, 0
    if self.ckpt and self.ckpt.latest() is not None:
      restored = self.ckpt.restore(self.state, params, opt_state, self.param_sh, self.opt_sh)
      if restored is not None:
        params, opt_state, meta = restored
        step, epoch, pos = meta["step"], meta["epoch"], meta["pos"]
        say(f"resumed from {self.ckpt.directory} at step {step}")
    self._start_step = step
    self.selection.drop_after(step)     # evaluations after the resumed step: trained again
    # records after the resumed step are written again: drop them (JSONL and TensorBoard)
    self.writer = MetricsWriter(self.workdir, resume_step=step)
    info = summary(self.state)
    self.param_counts = {k: info[k] for k in ("trainable_params", "total_params")}
    say(info["table"])

    # the bar says what the run is doing: evaluating, compiling, train, saving
    bar = tqdm(total=self.total, initial=step, dynamic_ncols=True, mininterval=1.0,
               disable=not self.main)
    phase = _Phase(bar)
    it = None
    try:
      untuned = None
      if step == 0 and tc.get("eval_at_start", True):
        phase("evaluating")
        untuned = self.evaluate(params)
        if self.main:
          bar.write(f"untuned {metric}: {untuned[metric]:.4f}", file=sys.stdout)
        self.writer.write(0, _scalars("eval", untuned))
      it = _prefetch(self.batches(epoch, pos))
      return self._loop(it, step, epoch, pos, params, opt_state, untuned, bar, phase, signals)
    finally:
      if it is not None:
        it.close()        # stops the prefetch thread (the batch source is endless)
      bar.close()

  def _loop(self, it, step, epoch, pos, params, opt_state, untuned, bar, phase, signals):
    tc, metric = self.cfg.train, self.cfg.eval.metric
    say = print if self.main else (lambda *a, **k: None)
    patience, bad_evals, best_loss = tc.get("early_stopping_patience") or 0, 0, math.inf
    last, keys = None, _StepKeys(self.rng)
    clock, conv_step = _StepClock(), None     # conv_step: the lowest validation loss's step
    self._lr(step)        # the schedule's eager operations compile here, outside the clock
    while step < self.total:
      ep, i, host, batch = next(it)
      compiles = clock.step_begins(batch, params)
      phase("compiling" if compiles else "train")
      params, opt_state, m = self.step_fn(params, opt_state, batch, keys(step))
      # this host's rows, times the hosts (an estimate of the global count)
      tokens = (int(host["input_mask"].sum()) + int(host["target_mask"].sum())) * \
          jax.process_count()
      clock.step_ends(params, compiles, tokens)
      step += 1
      fault(f"step:{step}")
      epoch, pos = (ep, i + 1) if i + 1 < self.steps_per_epoch else (ep + 1, 0)
      if last is not None and not bool(last["finite"]):   # one step behind: no sync per step
        self._diverged(step - 1, "the loss or gradient is not finite")
      last = m
      if step % tc.log_every == 0 or step == self.total:
        if not bool(m["finite"]):
          self._diverged(step, "the loss or gradient is not finite")
        loss = float(m["loss"])      # waits for the step: the clock's window is complete
        logged = {"train/loss": loss, "train/grad_norm": float(m["grad_norm"]),
                  "train/learning_rate": float(self._lr(step))}
        tps = clock.window_rate()    # steady state: compiling steps, evaluations, saves out
        if tps is not None:
          logged["train/tokens_per_s"] = tps
        self.writer.write(step, logged)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{logged['train/learning_rate']:.2e}",
                        **({"tok_s": f"{tps:.0f}"} if tps is not None else {}))
      bar.update(1)
      evaluate_now = tc.eval_every and step % tc.eval_every == 0 and step < self.total
      stop_early = False
      stop_now = self._agreed_stop(signals, step)
      if evaluate_now:
        clock.stop(params)
        phase("evaluating")
        res = self.evaluate(params)
        self.writer.write(step, _scalars("eval", res))
        if res["eval_loss"] < best_loss:       # early stopping watches the validation loss
          best_loss, bad_evals, conv_step = res["eval_loss"], 0, step
        else:
          bad_evals += 1
        phase("saving")
        self._save(step, params, opt_state, epoch, pos, res[metric], m)
        self.selection.record(step, res)       # after the save: a candidate has a checkpoint
        stop_early = bool(patience and bad_evals >= patience)
      elif step < self.total and (
          (tc.save_every and step % tc.save_every == 0)
          or (not tc.save_every and not tc.eval_every and pos == 0)     # an epoch ended
          or stop_now):
        clock.stop(params)
        phase("saving")
        self._save(step, params, opt_state, epoch, pos, None, m)
      if stop_now and step < self.total:
        bar.close()
        self.params = params
        raise Interrupted(step)
      if stop_early:
        say(f"early stopping at step {step}: validation loss has not improved for "
            f"{patience} evaluations")
        break
      if tc.get("stop_at_step") and step >= tc.stop_at_step and step < self.total:
        # an interruption drill: stop as a preempted job would, after the last save
        bar.close()
        self.params = params
        return {"interrupted_at": step, "steps": step, "metric": metric, "untuned": None,
                "tuned": None}
    clock.stop(params)
    if last is not None and not bool(last["finite"]):
      self._diverged(step, "the loss or gradient is not finite")
    # the final checkpoint and the adapter, before the final evaluation can fail
    phase("saving")
    self._save(step, params, opt_state, epoch, pos, None, last, force=True)
    if self.ckpt:
      from peft_jax.peft import save_adapter
      tr, fr = split_trainable(params, self.state.trainable)
      host = {k: sharding.gather(v) for k, v in tr.items()}     # collective: every process joins
      if self.main:
        save_adapter(self.state, unflatten({**fr, **host}),
                     os.path.join(self.workdir, "adapter"), base=self.base_info)
    phase("evaluating")
    final = self.evaluate(params)
    bar.close()
    self.writer.write(step, _scalars("eval", final))
    self.selection.record(step, final, final=True)    # the final step is a candidate too
    best_step, best_score = self.selection.best()
    self.params = params
    if final["eval_loss"] < best_loss:
      conv_step = step
    spe = self.steps_per_epoch
    return {"untuned": None if untuned is None else untuned[metric], "tuned": final[metric],
            "eval_loss": final["eval_loss"], "steps": step, "metric": metric,
            "best_step": best_step, "best": best_score,
            # seed 002 Table 4: the 1-based epoch of the lowest validation loss (what early
            # stopping watches), and the epochs run (steps / steps per epoch)
            "convergence_epoch": -(-(conv_step or step) // spe), "epochs_run": round(step / spe, 3),
            "train_seconds": clock.train_seconds(step), "timed_steps": clock.steps,
            # steady-state training throughput (timed steps only) and the compiling steps' time
            "tokens_per_s": clock.tokens_per_s(), "compile_seconds": round(clock.compile_seconds, 3),
            **self.param_counts}

  def _agreed_stop(self, signals, step: int) -> bool:
    """Whether to stop after this step for a signal. One process decides at once; several
    agree every ``log_every`` steps (an all-gather of their flags), so all of them save and
    stop at the same step, whichever received the signal."""
    if jax.process_count() == 1:
      return signals.received is not None
    if step % self.cfg.train.log_every:
      return False
    import numpy as np
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(signals.received is not None))
    return bool(np.any(flags))

  # ------------------------------------------------------------------ checkpoints
  def _save(self, step, params, opt_state, epoch, pos, metric, m, force=False):
    """A checkpoint of ``step``, written only when its state is good: the step's loss and
    gradient were finite, every trainable leaf and optimizer-state value is finite, and the
    new parameters give a finite loss on the first validation batch (weights that blew up to
    finite but huge values fail there)."""
    if not self.ckpt:
      return
    if m is not None and not bool(m["finite"]):
      self._diverged(step, "the loss or gradient is not finite")
    tr, _ = split_trainable(params, self.state.trainable)
    if not bool(self._saveable(tr, opt_state)):
      self._diverged(step, "the updated parameters or optimizer state are not finite")
    tot, _ = self.eval_loss_fn(params, self._probe_batch())
    if not math.isfinite(float(tot)):
      self._diverged(step, "the updated parameters give a non-finite loss on a validation batch")
    if self._config_pending:
      _write_run_config(self.workdir, self.cfg, self.base_info)
      self._config_pending = False
    self.ckpt.save(step, self.state, params, opt_state, epoch, pos, metric, force=force)

  def _probe_batch(self):
    """The first evaluation batch (the shape ``evaluate`` compiles for; every process builds
    the same one)."""
    if getattr(self, "_probe", None) is None:
      d, ec = self.cfg.data, self.cfg.eval
      idx = list(range(min(ec.batch_size, len(self.val_enc.source))))
      self._probe = make_batch(self.val_enc, idx, self.layout, self.pad, self.start,
                               d.max_source_len, d.max_target_len, batch_size=ec.batch_size)
    return self._probe

  def _diverged(self, step: int, what: str):
    """Stops the run; nothing of ``step`` is saved. When the step's loss failed, the state it
    started from (a checkpoint of step - 1) is suspect too and is set aside (moved, not
    deleted); the message names the newest checkpoint left, and the likely causes."""
    from_loss = what.startswith("the loss")
    suspect_from = step - 1 if from_loss else step
    good = self.ckpt.latest() if self.ckpt else None
    while good is not None and good >= suspect_from and good > self._start_step:
      good = self.ckpt.set_aside(good, "diverged")
    kept = (f"the last good checkpoint, step {good}, is kept in {self.ckpt.directory}; a rerun "
            f"resumes from it" if good is not None else "no checkpoint was saved")
    if from_loss and step == 1 and self._start_step == 0:
      causes = "the base weights or the data (the loss of the initial weights is not finite)"
    else:
      causes = (f"a learning rate too high (train.learning_rate={self.cfg.train.learning_rate:g}"
                f"{', no train.grad_clip' if not self.cfg.train.grad_clip else ''}), bad data, or "
                "the base weights")
    raise TrainingDiverged(
        f"training diverged at step {step}: {what}; {kept}. Likely cause: {causes}. To resume "
        "with a lower learning rate, rerun with --config.train.learning_rate=<lower> "
        "--allow_changed=train.learning_rate")

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
                "train.end_learning_rate", "train.weight_decay", "train.grad_clip", "train.seed",
                "train.drop_last")


def _prepare_workdir(workdir: str, main: bool) -> None:
  """The workdir exists, is a writable directory, and this run holds its lock (process 0);
  one :class:`ConfigError` line otherwise, before anything is read or written."""
  import atexit
  from peft_jax.integrity import WorkdirBusy, acquire_lock, release_lock
  inputs.writable_dir(workdir, "--workdir", "a directory (new or holding a previous run)")
  if main:
    try:
      acquire_lock(workdir)
    except WorkdirBusy as e:
      raise inputs.ConfigError(str(e)) from None
    except OSError as e:
      raise inputs.ConfigError(f"cannot write the lock in --workdir {workdir}: {e.strerror}") from None
    atexit.register(release_lock, workdir)


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


def _os_reason(msg: str) -> str:
  """tensorstore's long write errors -> the operating system's reason (``File too large
  (errno 27)``), else their first line, shortened."""
  import re
  m = re.search(r"([A-Za-z][^:\[\]]*?) \[os_error_code='(\d+)'\]", msg)
  if m:
    return f"{m.group(1).strip()} (errno {m.group(2)})"
  first = msg.splitlines()[0] if msg else ""
  return first[:300]


class _silence_background_errors:
  """While orbax saves, an error in its worker threads and tasks (a full disk) is raised
  again in this thread, where it becomes one error line; their own tracebacks (thread
  excepthook, absl and asyncio logging, coroutines closed at exit) are not printed.
  After a failure the silence stays: the process is about to exit."""

  def __init__(self):
    import logging
    self.loggers = [logging.getLogger(n) for n in ("asyncio", "absl")]
    self.saved = (threading.excepthook, sys.unraisablehook, [g.level for g in self.loggers])
    threading.excepthook = lambda args: None
    sys.unraisablehook = lambda args: None
    for g in self.loggers:
      g.setLevel(logging.CRITICAL + 1)

  def restore(self):
    threading.excepthook, sys.unraisablehook, levels = self.saved
    for g, level in zip(self.loggers, levels):
      g.setLevel(level)


class _Checkpointer:
  """Orbax: trainable leaves + optimizer state + step/data position; keeps the last
  ``train.keep_last`` and the best on validation (the step ``selection`` names, see
  peft_jax/selection.py; ``read_only`` for eval.py). Each step directory gets a
  checksum manifest once orbax has finished it; restore verifies it and falls back to the
  newest intact step, setting damaged ones aside in ``checkpoints.set_aside/``."""

  def __init__(self, workdir, tc, say=None, selection=None, read_only=False):
    import orbax.checkpoint as ocp
    self.ocp, self.tc, self.say = ocp, tc, say or (lambda *a, **k: None)
    self.selection, self.read_only = selection, read_only
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.aside = os.path.abspath(os.path.join(workdir, "checkpoints.set_aside"))
    self._open()

  def _open(self):
    ocp = self.ocp
    if self.read_only:     # eval.py: reads a step, never saves or deletes
      self.mngr = ocp.CheckpointManager(
          self.directory, options=ocp.CheckpointManagerOptions(read_only=True,
                                                               enable_async_checkpointing=False))
      return
    cm = ocp.checkpoint_managers
    # the last keep_last, and the step selection.json names as best on validation (orbax's
    # BestN would keep the latest of equal scores and cannot score the final step, which
    # is saved before its evaluation)
    policy = cm.AnyPreservationPolicy([
        cm.LatestN(n=max(int(self.tc.get("keep_last") or 2), 1)),
        _PreserveSelected(self)])
    self.mngr = ocp.CheckpointManager(
        self.directory, options=ocp.CheckpointManagerOptions(preservation_policy=policy,
                                                             enable_async_checkpointing=False))

  def latest(self):
    return self.mngr.latest_step()

  def step_dir(self, step):
    return os.path.join(self.directory, str(step))

  def save(self, step, state, params, opt_state, epoch, pos, metric, force=False):
    from peft_jax.integrity import write_manifest
    if self.mngr.latest_step() == step:
      return
    tr, _ = split_trainable(params, state.trainable)
    ocp = self.ocp
    args = ocp.args.Composite(
        trainable=ocp.args.StandardSave(unflatten(tr)),
        opt_state=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave({"step": step, "epoch": epoch, "pos": pos,
                                "method": state.method.name}))
    hooks = _silence_background_errors()    # orbax's worker threads re-raise here anyway
    try:
      self.mngr.save(step, args=args,
                     metrics=None if metric is None else {"metric": float(metric)}, force=force)
      self.mngr.wait_until_finished()
      hooks.restore()
      fault(f"checkpoint:{step}")
      if jax.process_index() == 0:
        write_manifest(self.step_dir(step))
    except Exception as e:  # orbax/tensorstore report a full disk as OSError or ValueError
      if not isinstance(e, (OSError, ValueError)):
        raise
      try:
        self.mngr.close()
      except Exception:  # noqa: BLE001  (already failing; the first error is the one to report)
        pass
      why = getattr(e, "strerror", None) or _os_reason(str(e))
      raise inputs.ConfigError(f"cannot save checkpoint step {step} in {self.directory}: {why}; "
                               "the checkpoints saved before are intact") from None

  def wait(self):
    self.mngr.wait_until_finished()

  def set_aside(self, step, why: str):
    """Moves step ``step`` out of the rotation into ``checkpoints.set_aside/`` (nothing is
    deleted); returns the newest remaining step (or None)."""
    if jax.process_index() == 0:
      os.makedirs(self.aside, exist_ok=True)
      dst = os.path.join(self.aside, f"{step}-{why}-{int(time.time())}")
      os.replace(self.step_dir(step), dst)
    if self.selection is not None:
      self.selection.forget(step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self.mngr.close()
    self._open()
    return self.mngr.latest_step()

  def restore(self, state, params, opt_state, param_sh, opt_sh):
    """The newest intact checkpoint, into this run's shardings whatever mesh wrote it;
    ``None`` when no intact one is left."""
    from peft_jax.integrity import manifest_problem
    while True:
      step = self.mngr.latest_step()
      if step is None:
        self.say(f"warning: no intact checkpoint in {self.directory}; training starts at step 0")
        return None
      problem = manifest_problem(self.step_dir(step))
      if problem is None:
        return self._restore(step, state, params, opt_state, param_sh, opt_sh)
      older = self.set_aside(step, "damaged")
      self.say(f"warning: checkpoint step {step} is damaged ({problem}); it is set aside in "
               f"{self.aside} and the run resumes from "
               f"{'step %d' % older if older is not None else 'the start'}")

  def restore_trainable(self, step, state, params, param_sh):
    """Step ``step``'s trainable leaves onto ``params`` (frozen leaves kept), without the
    optimizer state: ``(params, meta)``. For evaluation; the caller verifies the manifest."""
    params, _, meta = self._restore(step, state, params, None, param_sh, None)
    return params, meta

  def _restore(self, step, state, params, opt_state, param_sh, opt_sh):
    ocp = self.ocp
    tr, fr = split_trainable(params, state.trainable)
    fsh = flatten(param_sh)
    sds = lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
    abstract_tr = unflatten({k: sds(v, fsh[k]) for k, v in tr.items()})
    items = {"trainable": ocp.args.StandardRestore(abstract_tr), "meta": ocp.args.JsonRestore()}
    if opt_state is not None:
      items["opt_state"] = ocp.args.StandardRestore(
          jax.tree_util.tree_map(sds, opt_state, opt_sh))
    try:
      got = self.mngr.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises several types for structure/shape mismatches
      raise inputs.ConfigError(f"checkpoint {self.directory}/{step} does not match this run's "
                            f"model and method ({type(e).__name__}: {str(e)[:300]}); use another "
                            "--workdir or the config the checkpoint was written with") from None
    if got["meta"].get("method") != state.method.name:
      raise inputs.ConfigError(f"checkpoint {self.directory}/{step} was written by method "
                            f"{got['meta'].get('method')!r}, this run uses {state.method.name!r}")
    restored = flatten(got["trainable"])
    params = unflatten({**fr, **restored})
    return params, (got["opt_state"] if opt_state is not None else None), got["meta"]


class _PreserveSelected:
  """An orbax preservation policy: keeps the step the run's :class:`Selection` names as
  best on validation (whatever ``keep_last`` says)."""

  def __init__(self, ckpt: "_Checkpointer"):
    self.ckpt = ckpt

  def should_preserve(self, checkpoints, *, context=None):
    sel = self.ckpt.selection
    best = sel.best_step if sel is not None else None
    return [c.step == best for c in checkpoints]
