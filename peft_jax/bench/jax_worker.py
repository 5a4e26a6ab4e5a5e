"""The peft-jax side of ``bench.py``: one process per (model, method).

Runs as ``python -m peft_jax.bench.jax_worker`` and answers the orchestrator's JSON-line
commands (the protocol of :mod:`peft_jax.bench.hf_worker`). It sets the run up the way
``train.py`` does (:func:`peft_jax.builder.build` on a train config whose
``model.checkpoint`` is the benchmark's Hugging Face checkpoint), writes the method's
initial weights for the Hugging Face side (an HF PEFT adapter directory, or the
bottleneck-adapter leaves for AdapterHub), and then times:

* the training step, compiled ahead of time (``lower().compile()``: the compile time is
  reported on its own), then warm-up steps, then the blocks of steps the orchestrator asks
  for; the compiled step's memory analysis gives ``--plan``'s estimate (the figures of
  :func:`peft_jax.plan.plan`: arguments + outputs - aliased + temporaries) and
  :func:`peft_jax.plan.jaxpr_flops` its matmul FLOPs;
* greedy generation (:func:`peft_jax.decoding.generate`, no EOS stop) with the method's
  sites (unmerged) and after :func:`peft_jax.peft.merge` (merged, mergeable methods only).

The persistent compilation cache is off, so compile times are real compilations.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft_jax.bench.hf_worker import maxrss_bytes, serve  # noqa: E402


class Side:
  """The peft-jax run under test."""

  def setup(self, train_config, family, batches, export_kind="", export_path="", seed=0):
    import jax
    import numpy as np
    jax.config.update("jax_enable_compilation_cache", False)
    from peft_jax.builder import build
    from peft_jax.config_lib import resolve
    from peft_jax.peft import count
    t_setup = time.perf_counter()
    rss_base = maxrss_bytes() / 2**20
    cfg, _ = resolve(train_config)
    t0 = time.perf_counter()
    self.built = build(cfg, with_weights=True)
    self.load_s = time.perf_counter() - t0
    from peft_jax.models import family_of
    self.family = family
    self.seq2seq = family_of(self.built.mc).layout == "seq2seq"
    self.state = self.built.state
    self.params = self.state.params
    data = np.load(batches)
    keys = sorted({k.split("/", 1)[1] for k in data.files})
    n = len({k.split("/", 1)[0] for k in data.files})
    self.host_batches = [{k: data[f"{i}/{k}"] for k in keys} for i in range(n)]
    if export_kind:
      self._export(export_kind, export_path)
    f = self.built.eval_loss()
    tot, ntok = f(self.params, self.host_batches[0])
    info = count(self.state)
    dev = jax.local_devices()[0]
    limit = (dev.memory_stats() or {}).get("bytes_limit") if dev.platform != "cpu" else None
    self.setup_s = time.perf_counter() - t_setup
    return {"setup_s": self.setup_s, "trainable_params": int(info["trainable_params"]),
            "total_params": int(info["total_params"]), "load_s": self.load_s,
            "loss0": float(tot) / max(float(ntok), 1.0), "device": f"{dev.platform}:{dev.device_kind}",
            "rss_base_mb": rss_base, "rss_setup_mb": maxrss_bytes() / 2**20,
            "versions": _versions(),
            **({"device_limit_mb": limit / 2**20} if limit else {})}

  def _export(self, kind, path):
    """The method's initial weights for the Hugging Face side."""
    import numpy as np
    from peft_jax.peft import export_hf_peft
    from peft_jax.peft.base import flatten
    if kind == "peft":
      params = self.params
      if self.state.method.name == "prefix_tuning" and self.seq2seq:
        params = _hf_t5_prefix_layout(self.state, params)
        self.params = params
      export_hf_peft(self.state, params, path)
    elif kind == "adapterhub":
      flat = flatten(self.params)
      np.savez(path, **{k: np.asarray(flat[k], np.float32) for k in self.state.added})
    else:
      raise ValueError(f"unknown export kind {kind!r}")

  # ------------------------------------------------------------------ training
  def compile_train(self, warmup_steps=1, total_steps=1000):
    import jax
    from peft_jax.plan import jaxpr_flops
    opt, step, osh = self.built.train_step(total_steps)
    self.opt_state = jax.jit(opt.init, out_shardings=osh)(self.params)
    self.batches = [jax.device_put(b, self.built.batch_sh) for b in self.host_batches]
    self.keys = jax.random.split(jax.random.PRNGKey(0), 4096)
    self.step_i = 0
    args = (self.params, self.opt_state, self.batches[0], self.keys[0])
    t0 = time.perf_counter()
    self.step = step.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    flops = jaxpr_flops(step.trace(*args).jaxpr)
    plan = _memory_figures(self.step)
    in_use = _device_bytes_in_use()
    t0 = time.perf_counter()
    loss = None
    try:
      for _ in range(int(warmup_steps)):
        loss = self._step()
      jax.block_until_ready(self.params)
    except Exception as e:        # say what the compiled step asked for (an OOM's diagnosis)
      gib = lambda x: f"{x / 2**30:.2f} GiB"
      raise RuntimeError(
          f"{type(e).__name__}: {str(e)[:300]} [the compiled step: arguments "
          f"{gib(plan['argument_bytes'])}, temporaries {gib(plan['temp_bytes'])}, peak "
          f"{gib(plan['peak_bytes'])}; in use on the device before it: "
          f"{gib(in_use) if in_use is not None else 'n/a'}]") from e
    warmup = time.perf_counter() - t0
    return {"compile_s": compile_s, "warmup_s": warmup, "first_loss": float(loss),
            "flops_per_step": flops, "plan": plan,
            "time_to_train_s": self.setup_s + compile_s + warmup}

  def _step(self):
    i = self.step_i
    self.step_i += 1
    self.params, self.opt_state, m = self.step(self.params, self.opt_state,
                                               self.batches[i % len(self.batches)],
                                               self.keys[i % len(self.keys)])
    return m["loss"]

  def train(self, steps):
    import jax
    t0 = time.perf_counter()
    for _ in range(int(steps)):
      loss = self._step()
    jax.block_until_ready((self.params, loss))
    return {"seconds": time.perf_counter() - t0, "loss": float(loss), "steps_done": self.step_i}

  # ------------------------------------------------------------------ generation
  def infer_setup(self, kind, new_tokens, prompt_len):
    """Prepares ``kind`` (``unmerged`` or ``merged``); one warm-up generation (it compiles)."""
    from peft_jax.models import build_model
    from peft_jax.peft import merge
    if kind == "merged":
      self.gen_model, self.gen_params = build_model(self.built.mc), merge(self.state, self.params)
    else:
      self.gen_model, self.gen_params = self.built.model, self.state.prepare(self.params)
    b = self.host_batches[0]
    self.gen_ids = b["inputs"][:, :prompt_len]
    self.gen_mask = b["input_mask"][:, :prompt_len].astype(bool)
    self.new_tokens = int(new_tokens)
    out = self.infer()
    out["warmup_s"] = out.pop("seconds")
    return out

  def infer(self):
    import jax
    from peft_jax.decoding import generate
    t0 = time.perf_counter()
    out = generate(self.gen_model, self.gen_params, self.gen_ids, self.gen_mask,
                   max_new_tokens=self.new_tokens, eos_token_id=-1, pad_token_id=0)
    out = jax.block_until_ready(out)
    return {"seconds": time.perf_counter() - t0, "new_tokens": int(out.shape[1]),
            "rows": int(out.shape[0])}

  # ------------------------------------------------------------------ memory
  def memory(self):
    import jax
    out = {"maxrss_mb": maxrss_bytes() / 2**20}
    dev = jax.local_devices()[0]
    if dev.platform != "cpu":
      stats = dev.memory_stats() or {}
      if "peak_bytes_in_use" in stats:
        out["device_peak_mb"] = stats["peak_bytes_in_use"] / 2**20
    return out


def _device_bytes_in_use():
  import jax
  dev = jax.local_devices()[0]
  return None if dev.platform == "cpu" else (dev.memory_stats() or {}).get("bytes_in_use")


def _memory_figures(compiled):
  """``--plan``'s per-device figures of a compiled step (as :func:`peft_jax.plan.plan`)."""
  mem = compiled.memory_analysis()
  g = lambda name: int(getattr(mem, name, 0) or 0) if mem is not None else 0
  arg, out, tmp, alias = (g("argument_size_in_bytes"), g("output_size_in_bytes"),
                          g("temp_size_in_bytes"), g("alias_size_in_bytes"))
  return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": tmp, "alias_bytes": alias,
          "peak_bytes": arg + out - alias + tmp}


def _hf_t5_prefix_layout(state, params):
  """T5 prefixes in HF PEFT's seq2seq layout: decoder layers ``l`` and ``l + L/2`` share one
  prefix when ``L`` is even (see :mod:`peft_jax.peft.prefix_tuning`), so layer ``l``'s prefix
  is copied to ``l + L/2`` before the export (both sides then start equal)."""
  from peft_jax.peft.base import flatten, unflatten
  L = state.model_cfg.n_decoder_layers
  if L % 2:
    return params
  flat = dict(flatten(params))
  for name in ("prefix_key", "prefix_value"):
    k = f"decoder/layers/self_attn/{name}"
    if k in flat:
      a = flat[k]
      flat[k] = a.at[L // 2:].set(a[: L // 2])
  return unflatten(flat)


def _versions():
  import jax
  import jaxlib
  import flax
  import optax
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__}


def main():
  side = Side()
  serve({"setup": side.setup, "compile_train": side.compile_train, "train": side.train,
         "infer_setup": side.infer_setup, "infer": side.infer, "memory": side.memory})


if __name__ == "__main__":
  main()
