"""peft-jax: parameter-efficient fine-tuning for T5 and LLaMA in JAX/Flax.

Design in one paragraph
-----------------------
Models are written in **Flax linen**, not nnx. Linen keeps parameters outside
the modules as a plain nested dict (a pytree), and ``model.apply(params, ...)``
is a pure function of that tree. That is exactly the shape PEFT wants: a
method is a pure function ``params -> params'`` that adds leaves (LoRA
factors, prefixes, adapters) or marks existing leaves trainable, and the
optimizer is masked by regexes over the flattened paths of that tree
(``encoder/layers/attn/q/kernel``). Linen also gives us mature ``nn.scan`` over
layers, ``nn.remat`` policies and logical-axis partitioning metadata that a
sharding layer maps onto a device mesh by rules.

Models expose *sites* (see :mod:`peft_jax.sites`): named places where a PEFT
method may act (every linear projection, attention keys/values, the FFN
activation, each sub-layer's output, the input embeddings). A method plugs
handlers into these sites; model files never name a method.
"""

__version__ = "0.1.0"
