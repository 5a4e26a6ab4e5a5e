"""The PEFT method protocol and the pure transform of the parameter tree.

A method is an object registered under its config name. Given the frozen base
tree (flattened to ``path -> array``, or ``path -> ShapeDtypeStruct`` for an
abstract build), a method says

* which **existing** leaves become trainable (``trainable_existing``: pure
  Python on the path names, e.g. BitFit's biases, LayerNorm tuning's scales),
* which **new** leaves it adds (``init_leaves``: arrays created from an RNG
  key; runs under ``jax.eval_shape`` for an abstract build),
* which **site handlers** realise it in the forward pass (``handlers``).

:func:`apply_peft` combines these into a :class:`PeftState`: the new tree, the
boolean trainable mask (same structure), and the ``Sites`` to build the model
with. Nothing in a model file names a method.

Every method also gets the ``modules_to_save`` hyperparameter (added at registration):
:mod:`peft_jax.peft.modules_to_save` resolves it here, independently of the method, into
``PeftState.saved`` (fully trained module leaves: trainable, saved, counted).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Set, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from peft_jax.fields import Field, FieldError, did_you_mean
from peft_jax.sites import Sites
from peft_jax.tree import Flat, flatten, join, split_trainable, unflatten  # noqa: F401  (re-exported)



class PeftConfigError(ValueError):
  """A PEFT configuration is invalid (unknown method, bad target, bad hyperparameter)."""




class Method:
  """Base class; subclasses override what they need."""
  name: str = ""
  #: the hyperparameters, named as in the reference library: ``{name: Field(default, doc,
  #: kind, range)}`` (see :mod:`peft_jax.fields`); the one declaration behind the config
  #: surface (``--config.peft.<name>``), the type checks and ``--print_config``
  hparams: Dict[str, Field] = {}
  #: ``{name: default}``, derived from ``hparams`` at registration
  defaults: Dict[str, Any] = {}
  #: which library's names and defaults these follow, for the docs
  reference: str = ""
  #: True when the method can be folded into the base weights
  mergeable: bool = False
  #: True when the model with the method's fresh leaves computes exactly the base model
  #: (e.g. LoRA's B = 0); the conformance test holds the method to it
  identity_at_init: bool = False
  #: hyperparameters for a small example run (the method's required ones, and sizes that
  #: fit the tiny test models): the conformance and command-line tests use them
  example_hparams: Dict[str, Any] = {}

  def validate(self, model_cfg, hp: Dict[str, Any], flat: Flat) -> None:
    """Raise :class:`PeftConfigError` for bad input, before any compute."""

  def trainable_existing(self, model_cfg, hp, paths) -> Set[str]:
    return set()

  def init_leaves(self, model_cfg, hp, flat: Flat, rng) -> Flat:
    return {}

  def handlers(self, model_cfg, hp) -> Tuple[Any, ...]:
    return ()

  def counted_params(self, model_cfg, hp, flat: Flat, trainable: Set[str]) -> Optional[int]:
    """Override when not every element of the trainable leaves is a real parameter
    (e.g. stacked leaves for layers that a layer selection left out)."""
    return None

  def update_masks(self, model_cfg, hp, flat: Flat) -> Dict[str, Any]:
    """Element masks (boolean numpy arrays broadcastable to the leaf) for trainable
    leaves of which only a part is trained, e.g. the selected layers of a stacked
    ``[layers, ...]`` leaf. Pure Python/numpy on shapes. Leaves not named: all trained."""
    return {}

  def leaf_roles(self, model_cfg, hp, paths) -> Dict[str, str]:
    """Roles of leaves (``paths``: the whole tree's) that differ from the default, where the
    method's new leaves and the existing leaves it makes trainable are trained with weight
    decay: ``"frozen"`` (a new leaf that is a constant, e.g. a per-layer on/off flag: no
    gradient, no optimizer state) or ``"no_decay"`` (trained without weight decay, e.g.
    scaling vectors). Biases and norm scales never decay, for every method
    (:data:`peft_jax.step.NO_DECAY`)."""
    return {}

  def changed_params(self, model_cfg, hp, flat: Flat) -> Optional[int]:
    """Entries of the base model's own weights that the method alters (folds into or
    trains); None: the made-trainable existing leaves (respecting update masks)."""
    return None

  def prepare_params(self, model_cfg, hp, flat: Flat) -> Flat:
    """Maps the stored tree to the tree the model reads (a reparameterisation
    evaluated before the forward, e.g. prefix tuning's MLP). Default: unchanged."""
    return flat

  # per-step training hooks (methods whose training needs more than the masked optimizer
  # step, e.g. AdaLoRA). ``make_train_step`` calls them only for methods that override them
  # (``has_step_hooks``), so the default methods train exactly as before.
  def loss_terms(self, model_cfg, hp, flat: Flat):
    """A scalar added to the training loss (differentiated with it), e.g. a regulariser;
    ``flat`` is the stored tree (trainable and frozen leaves). None: nothing is added."""
    return None

  def init_hook_state(self, model_cfg, hp, flat: Flat) -> Any:
    """A pytree carried between steps for :meth:`after_step` (e.g. importance averages)."""
    return None

  def after_step(self, model_cfg, hp, step, flat: Flat, grads: Flat, hook_state) -> Tuple[Flat, Any]:
    """Runs (jit-traced) after each optimizer update: ``step`` is the 0-based index of the
    update just applied (an int32 scalar), ``flat`` the updated tree, ``grads`` this step's
    gradients (zeros on frozen leaves). Returns ``(flat, hook_state)``; it may only change
    trainable leaves."""
    return flat, hook_state

  @property
  def has_step_hooks(self) -> bool:
    cls = type(self)
    return any(getattr(cls, n) is not getattr(Method, n)
               for n in ("loss_terms", "init_hook_state", "after_step"))

  # Hugging Face PEFT mapping (peft_jax.peft.hf_peft): the peft_type, and the conversion
  #: the HF PEFT ``peft_type`` this method maps to (None: no mapping)
  hf_peft_type: Optional[str] = None
  #: how the import treats each ``adapter_config.json`` field beyond the common ones
  #: (``hf_peft.check_fields``): ``"used"``, ``"noop"`` or ``(accepted values, why
  #: others are refused)``; None: fields not checked (the tensors still are)
  hf_fields: Optional[Dict[str, Any]] = None

  def hf_export(self, state, params) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``(adapter_config fields, {tensor name: array})`` in HF PEFT's layout."""
    raise PeftConfigError(f"method {self.name!r} has no HF PEFT mapping")

  def hf_import(self, conf, tensors, model_cfg, base_params, path: str):
    """``(state, params)`` from an HF PEFT adapter of this method's ``peft_type``."""
    raise PeftConfigError(f"method {self.name!r} has no HF PEFT mapping")

  # reparameterisations
  def merge(self, model_cfg, hp, flat: Flat) -> Flat:
    raise PeftConfigError(f"method {self.name!r} cannot be merged into the base weights")

  def unmerge(self, model_cfg, hp, flat: Flat) -> Flat:
    raise PeftConfigError(f"method {self.name!r} cannot be unmerged")


_REGISTRY: Dict[str, Method] = {}


def register(cls):
  inst = cls()
  if not inst.name:
    raise ValueError(f"{cls.__name__} has no name")
  if "modules_to_save" not in cls.hparams:     # every method's (peft_jax.peft.modules_to_save)
    from peft_jax.peft.modules_to_save import FIELD
    cls.hparams = {**cls.hparams, "modules_to_save": FIELD}
  cls.defaults = {k: f.default for k, f in cls.hparams.items()}
  _REGISTRY[inst.name] = inst
  return cls


def get_method(name: str) -> Method:
  if name not in _REGISTRY:
    raise PeftConfigError(f"unknown PEFT method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
  return _REGISTRY[name]


def registered_methods():
  return sorted(_REGISTRY)


def resolve_hparams(method: Method, overrides: Mapping[str, Any]) -> Dict[str, Any]:
  """The method's defaults updated with ``overrides``, each checked against its declared
  :class:`~peft_jax.fields.Field` (kind, range, choices)."""
  hp = dict(method.defaults)
  unknown = sorted(set(overrides) - set(hp))
  if unknown:
    hint = did_you_mean(unknown[0], list(hp)) if len(unknown) == 1 else ""
    raise PeftConfigError(f"unknown hyperparameter(s) {unknown} for method {method.name!r}{hint} "
                          f"(expected some of {sorted(hp)})")
  for k, v in overrides.items():
    try:
      hp[k] = method.hparams[k].normalise(v)
    except FieldError as e:
      raise PeftConfigError(f"{method.name}: {k}={e}") from None
  return hp


@dataclasses.dataclass
class PeftState:
  method: Method
  hparams: Dict[str, Any]
  params: Any            # nested dict: base leaves + the method's leaves
  trainable: Any         # same structure, bools
  sites: Sites
  added: Tuple[str, ...]           # paths of the method's own leaves
  made_trainable: Tuple[str, ...]  # existing paths made trainable
  model_cfg: Any = None
  update_masks: Dict[str, Any] = dataclasses.field(default_factory=dict)  # path -> bool array
  no_decay: Tuple[str, ...] = ()   # trainable paths the method keeps out of weight decay
  base_model: str = ""             # where the base weights came from (model.checkpoint)
  saved: Tuple[str, ...] = ()      # leaves of the fully trained modules (modules_to_save)

  # per-step hooks on nested trees (see Method.loss_terms / init_hook_state / after_step)
  @property
  def has_step_hooks(self) -> bool:
    return self.method.has_step_hooks

  def loss_terms(self, params):
    """The method's extra loss (a scalar) or None."""
    return self.method.loss_terms(self.model_cfg, self.hparams, flatten(params))

  def init_hook_state(self, params):
    return self.method.init_hook_state(self.model_cfg, self.hparams, flatten(params))

  def after_step(self, step, params, grads, hook_state):
    """``(params, hook_state)`` after the method's per-step hook (trees as given)."""
    fl, hs = self.method.after_step(self.model_cfg, self.hparams, step, flatten(params),
                                    flatten(grads), hook_state)
    return unflatten(fl), hs

  def prepare(self, params):
    """The tree the model reads: ``build_model(cfg, state.sites).apply({'params': state.prepare(p)}, ...)``."""
    fl = flatten(params)
    out = self.method.prepare_params(self.model_cfg, self.hparams, fl)
    return params if out is fl else unflatten(out)


def _is_abstract(flat: Flat) -> bool:
  return any(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())


def apply_peft(model_cfg, params, method_name: str, overrides: Optional[Mapping[str, Any]] = None,
               rng=None) -> PeftState:
  """The pure transform: base tree -> (tree with the method's leaves, trainable mask, sites)."""
  method = get_method(method_name)
  hp = resolve_hparams(method, overrides or {})
  flat = flatten(params)
  method.validate(model_cfg, hp, flat)
  made = set(method.trainable_existing(model_cfg, hp, list(flat)))
  rng = jax.random.PRNGKey(0) if rng is None else rng
  if _is_abstract(flat):
    new = jax.eval_shape(lambda f, r: method.init_leaves(model_cfg, hp, f, r), flat, rng)
  else:
    new = method.init_leaves(model_cfg, hp, flat, rng)
  clash = sorted(set(new) & set(flat))
  if clash:
    raise PeftConfigError(f"method {method.name!r} would overwrite existing leaves {clash[:5]}")
  saved, saved_new, saved_masks = {}, {}, {}
  if hp.get("modules_to_save"):
    from peft_jax.peft import modules_to_save
    saved, saved_new, saved_masks = modules_to_save.apply(model_cfg, hp["modules_to_save"], flat,
                                                          new, made)
  out = dict(flat)
  out.update(new)
  roles = method.leaf_roles(model_cfg, hp, list(out))
  masks = dict(method.update_masks(model_cfg, hp, out))
  out.update(saved_new)
  masks.update(saved_masks)
  bad = sorted(k for k, r in roles.items() if r not in ("frozen", "no_decay"))
  if bad:
    raise ValueError(f"method {method.name!r}: unknown leaf roles for {bad[:3]}")
  mask = {k: ((k in made or k in new) and roles.get(k) != "frozen") or k in saved or k in saved_new
          for k in out}
  return PeftState(method=method, hparams=hp, params=unflatten(out), trainable=unflatten(mask),
                   sites=Sites(tuple(method.handlers(model_cfg, hp))),
                   added=tuple(sorted(new)), made_trainable=tuple(sorted(made)),
                   model_cfg=model_cfg, update_masks=masks,
                   no_decay=tuple(sorted(k for k, r in roles.items() if r == "no_decay" and mask[k])),
                   saved=tuple(sorted(set(saved) | set(saved_new))))
