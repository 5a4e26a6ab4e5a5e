"""Parameter-efficient fine-tuning methods for the T5 and LLaMA models.

Importing this package registers the methods: ``full``, ``lora``, ``dora``,
``bitfit``, ``ln_tuning``, ``ia3``, ``prompt_tuning``, ``prefix_tuning`` (and
the bottleneck adapters ``houlsby``, ``pfeiffer``, ``parallel``).

Typical use::

    from peft_jax import peft
    from peft_jax.models import build_model
    state = peft.apply_peft(cfg, params, "lora", {"r": 16, "target_modules": "all-linear"})
    model = build_model(cfg, state.sites)
    fwd = peft.apply_fn(state, model)               # applies state.prepare (prefix MLP)
    print(peft.summary(state)["table"])
"""

from peft_jax.peft.base import (Method, PeftConfigError, PeftState, apply_peft, flatten, get_method,
                                join, register, registered_methods, split_trainable, unflatten)
from peft_jax.peft import (full, lora, bitfit, ln_tuning, ia3, prompt_tuning,  # noqa: F401
                           prefix_tuning, adapters)  # (importing registers the methods)
from peft_jax.peft import compacter, mam, unipelt  # noqa: F401,E402  (registers compacter, compacter_pp, mam, unipelt)
from peft_jax.peft import krona, adalora, tfew, ah_prefix_tuning  # noqa: F401,E402  (KronA, AdaLoRA, T-Few, AdapterHub prefix)
from peft_jax.peft.accounting import count, describe, summary, table
from peft_jax.peft.optimizer import apply_fn, make_optimizer, value_and_grad
from peft_jax.peft.merging import merge, unmerge
from peft_jax.peft.io import adapter_leaves, load_adapter, save_adapter
from peft_jax.peft.hf_peft import export_hf_peft, import_hf_peft
from peft_jax.peft.prefix_tuning import fold_projection

__all__ = ["Method", "PeftConfigError", "PeftState", "apply_peft", "flatten", "unflatten", "join",
           "split_trainable", "get_method", "register", "registered_methods", "count", "describe",
           "summary", "table", "apply_fn", "make_optimizer", "value_and_grad",
           "merge", "unmerge", "adapter_leaves", "save_adapter", "load_adapter", "export_hf_peft",
           "import_hf_peft", "fold_projection"]
