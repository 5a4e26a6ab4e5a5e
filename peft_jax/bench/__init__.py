"""The efficiency benchmark behind ``bench.py``: peft-jax side by side with Hugging Face.

* :mod:`peft_jax.bench.config`: ``configs/bench.py`` and its overrides, checked up front;
* :mod:`peft_jax.bench.runner`: checkpoints, batches, the two worker processes per row
  and their turns;
* :mod:`peft_jax.bench.jax_worker` / :mod:`peft_jax.bench.hf_worker`: the two sides (the
  Hugging Face one imports neither JAX nor peft_jax, so AdapterHub's venv can run it);
* :mod:`peft_jax.bench.report`: tables, the PNG, the JSON line and ``docs/benchmarks.md``.
"""
