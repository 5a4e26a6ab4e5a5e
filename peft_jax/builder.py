"""One setup for every entry point: config -> model, PEFT state, mesh and shardings, the step.

``train.py`` (the :class:`~peft_jax.trainer.Trainer`), ``eval.py``, ``--plan`` and
``--dry_run`` all start here, so they agree on the model config, the method's leaves, the
mesh, the parameter shardings (logical rules and ``mesh.param_rules``), the base-weight
PRNG key and the training step.

Shapes first, then shardings, then weights:

1. :func:`build` makes the abstract parameter tree (``jax.eval_shape``), applies the PEFT
   method to it, builds the mesh from ``config.mesh`` and derives every leaf's sharding.
   Config errors (batch sizes that do not split over the mesh, bad rules, bad
   hyperparameters) surface here, before any weights or data.
2. :meth:`Built.with_weights` reads or creates the base weights straight into their
   shards and places the method's new leaves.
3. :meth:`Built.train_step` makes the optimizer and the one jitted training step
   (:func:`peft_jax.step.make_train_step`) for a number of total steps (the schedule).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import jax

from peft_jax import inputs
from peft_jax import sharding
from peft_jax.models import abstract_params, build_model
from peft_jax.peft import apply_peft
from peft_jax.peft.base import PeftState, flatten, unflatten


@dataclasses.dataclass(frozen=True)
class Built:
  """A run's setup (immutable). ``state.params`` are ``ShapeDtypeStruct``s until
  :meth:`with_weights`."""
  cfg: Any
  mc: Any                      # the model config (its family: peft_jax.models.family_of)
  state: PeftState
  model: Any                   # the Flax module with the method's sites
  mesh: Any
  rules: Tuple
  specs: Dict[str, Any]        # flat path -> PartitionSpec
  dropped: Dict[str, Any]      # flat path -> dims left unsplit
  param_sh: Any                # nested NamedShardings, base + method leaves
  base_sh: Any                 # nested NamedShardings of the base leaves only
  batch_sh: Any
  accum: int                   # gradient-accumulation steps
  base_info: Optional[Dict[str, Any]] = None    # set by with_weights (run.base_info)

  @property
  def abstract(self) -> bool:
    return self.base_info is None

  @property
  def micro_batch(self) -> int:
    return self.cfg.train.batch_size // self.accum

  def describe_mesh(self) -> str:
    return sharding.describe(self.mesh, self.specs, self.dropped, flatten(self.state.params))

  def with_weights(self) -> "Built":
    """The base weights (``model.checkpoint``, else the preset's random init from
    ``train.seed``) straight into their shards, and the method's leaves placed."""
    cfg = self.cfg
    base = inputs.base_params(cfg, self.mc, inputs.base_key(cfg), shardings=self.base_sh)
    info = inputs.base_info(cfg, base)
    inputs.check_finite_base(base, info)
    state = apply_peft(self.mc, base, self.state.method.name, self.state.hparams,
                       rng=method_key(cfg))
    state = dataclasses.replace(state, params=sharding.put_tree(state.params, self.param_sh),
                                base_model=self.state.base_model)
    return dataclasses.replace(self, state=state, base_info=info)

  def train_step(self, total_steps: int, donate: bool = True):
    """``(optimizer, jitted step, optimizer-state shardings)`` for ``total_steps`` (the
    schedule's length); see :func:`peft_jax.step.make_train_step`."""
    from ml_collections import ConfigDict
    from peft_jax.step import make_train_step, make_tx, opt_state_shardings
    tx = make_tx(ConfigDict(self.cfg.train.to_dict() | {"total_steps": int(total_steps)}),
                 self.state.params, self.state.no_decay)
    opt, step = make_train_step(self.state, self.model, tx, accum_steps=self.accum,
                                mesh=self.mesh, param_shardings=self.param_sh,
                                rules=self.rules, donate=donate, micro_rows=self.micro_batch)
    return opt, step, opt_state_shardings(opt, self.state.params, self.param_sh, self.mesh)

  def eval_loss(self):
    from peft_jax.step import make_eval_loss
    return make_eval_loss(self.state, self.model, self.mesh, self.param_sh)


def method_key(cfg):
  """The PRNG key of the method's new leaves."""
  return jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 1)


def build(cfg, devices: Optional[Sequence[Any]] = None, peft: Optional[Dict[str, Any]] = None,
          with_weights: bool = False) -> Built:
  """The setup of ``cfg`` (resolved or not; it is checked here), abstract unless
  ``with_weights``. ``devices``: the mesh's devices (default: ``config.mesh`` over the
  visible ones); ``peft``: ``{"method", **hparams}`` instead of ``config.peft`` (e.g. an
  adapter's own, for evaluation)."""
  from peft_jax.config_lib import resolve
  cfg, _ = resolve(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  tc = cfg.train
  mc = inputs.model_config(cfg)
  if peft is None:
    method, overrides = cfg.peft.method, inputs.peft_overrides(cfg)
  else:
    method, overrides = peft["method"], {k: v for k, v in peft.items() if k != "method"}
  state = apply_peft(mc, abstract_params(mc), method, overrides)
  if cfg.model.get("checkpoint"):     # HF PEFT exports name it (AutoPeftModel* load it)
    where = inputs.resolve_path(cfg.model.checkpoint)
    state = dataclasses.replace(state, base_model=os.path.abspath(where)
                                if os.path.exists(where) else where)
  if peft is None and cfg.data.get("pack") is True:
    from peft_jax.data.packing import packing_problem
    problem = packing_problem(state.sites)
    if problem:
      raise inputs.ConfigError(f"data.pack=true: method {method!r} cannot train on packed rows: "
                               f"{problem}; use data.pack=auto or false")
  if devices is None:
    mesh = inputs.make_mesh(cfg)
  else:
    try:
      mesh = sharding.make_mesh(cfg.mesh, devices)
    except sharding.ShardingError as e:
      raise inputs.ConfigError(f"config.mesh: {e}") from None
  shards = sharding.batch_shards(mesh)
  per_device = int(tc.get("micro_batch_per_device") or 0)
  if per_device:    # a per-accelerator setting (e.g. the survey's Table 3, one GPU each)
    micro = min(int(tc.batch_size), per_device * shards)
    if tc.batch_size % micro:
      raise inputs.ConfigError(
          f"train.micro_batch_per_device={per_device} on {shards} data x fsdp devices gives "
          f"micro-batches of {micro} rows, which do not divide train.batch_size="
          f"{tc.batch_size}; expected a per-device size whose multiple divides the batch")
  else:
    micro = int(tc.micro_batch_size or tc.batch_size)
    if tc.batch_size % micro:
      raise inputs.ConfigError(f"train.batch_size={tc.batch_size} must be a multiple of "
                               f"train.micro_batch_size={micro}")
  if micro % shards:
    raise inputs.ConfigError(
        f"the micro-batch ({micro} rows) must split evenly over the mesh's data x fsdp = "
        f"{shards} devices (mesh {dict(mesh.shape)}); change train.micro_batch_size, or "
        "config.mesh (tensor > 1, or num_devices)")
  try:
    rules = sharding.parse_rules(cfg.mesh.rules)
    specs, dropped = sharding.param_specs(mc, state.params, mesh, rules, cfg.mesh.param_rules,
                                   added=state.added)
  except sharding.ShardingError as e:
    raise inputs.ConfigError(f"config.mesh: {e}") from None
  param_sh = unflatten({k: sharding.NamedSharding(mesh, v) for k, v in specs.items()})
  base_paths = set(flatten(abstract_params(mc)))
  base_sh = unflatten({k: v for k, v in flatten(param_sh).items() if k in base_paths})
  built = Built(cfg=cfg, mc=mc, state=state, model=build_model(mc, state.sites), mesh=mesh,
                rules=rules, specs=specs, dropped=dropped, param_sh=param_sh, base_sh=base_sh,
                batch_sh=sharding.batch_sharding(mesh), accum=tc.batch_size // micro)
  return built.with_weights() if with_weights else built
