"""Reference forward passes with AdapterHub (``adapters`` 1.3.0, transformers 4.57).

Runs inside ``.venv-adapters`` (made by ``.ci/adapterhub_env.sh``), as a
subprocess of ``tests/test_peft_adapters.py``; it never imports peft_jax.

Usage: ``python tests/adapterhub_ref.py WORKDIR``. ``WORKDIR/cases.json`` lists
cases, each::

  {"id": str, "model_type": "t5" | "llama", "config": {HF config kwargs},
   "base": "<safetensors with the base weights, HF names>",
   "adapter_class": "DoubleSeqBnConfig" | "SeqBnConfig" | "ParBnConfig",
   "adapter_kwargs": {BnConfig overrides},
   "adapter_weights": "<npz: peft-jax stacked leaves, e.g. encoder/layers/adapter_attn/down/kernel [L, in, out]>",
   "inputs": "<npz: input_ids (+ attention_mask, decoder_input_ids for T5)>"}

For each case it builds the torch model from the explicit config kwargs, loads
the base state dict, adds the adapter with the AdapterHub config, copies the
adapter weights into AdapterHub's modules (failing if either side has an
adapter the other lacks), runs one forward pass in fp32 eval mode and writes
``WORKDIR/<id>.npz`` (``logits``; ``base_logits`` with the adapter deactivated) and ``WORKDIR/<id>.json`` (``trainable``:
AdapterHub's trainable parameter count after ``train_adapter``, ``locations``:
where AdapterHub put adapters, as ``prefix|site|layer``).
"""
import json
import logging
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import adapters  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

logging.getLogger("adapters").setLevel(logging.ERROR)

T5_KEYS = ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "num_layers", "num_decoder_layers",
           "feed_forward_proj", "tie_word_embeddings", "relative_attention_num_buckets",
           "relative_attention_max_distance", "layer_norm_epsilon", "dropout_rate", "pad_token_id",
           "eos_token_id", "decoder_start_token_id")
LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "num_hidden_layers", "head_dim", "rms_norm_eps", "rope_theta",
              "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
              "eos_token_id", "pad_token_id", "hidden_act", "attention_bias", "mlp_bias")
TIED_OK = {"lm_head.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight"}
NAME = "bn"


def build(case):
  cfg_kw = case["config"]
  if case["model_type"] == "t5":
    kw = {k: cfg_kw[k] for k in T5_KEYS if k in cfg_kw}
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**kw))
  else:
    kw = {k: cfg_kw[k] for k in LLAMA_KEYS if k in cfg_kw}
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
  sd = load_file(case["base"])
  if case["model_type"] == "t5" and not kw.get("tie_word_embeddings", True) and "lm_head.weight" not in sd:
    # a tied head without the rescale (transformers 5's scale_decoder_outputs=False): in 4.x
    # that is an untied head holding a copy of the shared embedding
    sd["lm_head.weight"] = sd["shared.weight"].clone()
  missing, unexpected = model.load_state_dict(sd, strict=False)
  bad = [k for k in missing if k not in TIED_OK]
  if bad or unexpected:
    raise RuntimeError(f"{case['id']}: base state dict mismatch: missing {bad}, unexpected {unexpected}")
  model.tie_weights()
  return model.float().eval()


def bottleneck_layers(model, model_type):
  """``(prefix, site, layer index) -> BottleneckLayer`` for every sub-layer AdapterHub can adapt."""
  out = {}
  if model_type == "t5":
    for prefix, stack in (("encoder/layers", model.encoder), ("decoder/layers", model.decoder)):
      for i, block in enumerate(stack.block):
        layers = block.layer
        if stack.is_decoder:
          out[(prefix, "self_attn", i)] = layers[0]
          out[(prefix, "cross_attn", i)] = layers[1]
        else:
          out[(prefix, "attn", i)] = layers[0]
        out[(prefix, "mlp", i)] = layers[-1]
  else:
    for i, layer in enumerate(model.model.layers):
      out[("layers", "attn", i)] = layer.attention_adapters
      out[("layers", "mlp", i)] = layer.output_adapters
  return out


def set_adapter(adapter, w, prefix, site, i):
  def get(name):
    key = f"{prefix}/adapter_{site}/{name}"
    if key not in w:
      raise RuntimeError(f"AdapterHub has an adapter at {prefix}|{site}|{i} but the test gave no {key}")
    return torch.from_numpy(np.ascontiguousarray(w[key][i]))

  linears = [m for m in adapter.adapter_down if isinstance(m, torch.nn.Linear)]
  assert len(linears) == 1, adapter.adapter_down
  with torch.no_grad():
    linears[0].weight.copy_(get("down/kernel").T)
    linears[0].bias.copy_(get("down/bias"))
    adapter.adapter_up.weight.copy_(get("up/kernel").T)
    adapter.adapter_up.bias.copy_(get("up/bias"))
    if adapter.add_layer_norm_before:
      adapter.adapter_norm_before.weight.copy_(get("ln_before/scale"))
      adapter.adapter_norm_before.bias.copy_(get("ln_before/bias"))
    if adapter.add_layer_norm_after:
      adapter.adapter_norm_after.weight.copy_(get("ln_after/scale"))
      adapter.adapter_norm_after.bias.copy_(get("ln_after/bias"))
    if isinstance(adapter.scaling, torch.nn.Parameter):
      adapter.scaling.copy_(get("scaling").reshape(adapter.scaling.shape))


def run_case(case, workdir):
  model = build(case)
  adapters.init(model)
  cfg = getattr(adapters, case["adapter_class"])(**case["adapter_kwargs"])
  model.add_adapter(NAME, config=cfg)
  model.train_adapter(NAME)
  trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
  w = dict(np.load(case["adapter_weights"]))
  locations = []
  for (prefix, site, i), layer in sorted(bottleneck_layers(model, case["model_type"]).items()):
    if NAME in layer.adapters:
      set_adapter(layer.adapters[NAME], w, prefix, site, i)
      locations.append(f"{prefix}|{site}|{i}")
  used_sites = {loc.rsplit("|", 1)[0] for loc in locations}
  given = {k.split("/adapter_")[0] + "|" + k.split("/adapter_")[1].split("/")[0] for k in w}
  if given - used_sites:
    raise RuntimeError(f"{case['id']}: the test gave adapters at {sorted(given - used_sites)} "
                       f"where AdapterHub has none (AdapterHub: {sorted(used_sites)})")
  model.eval()
  inp = {k: torch.from_numpy(v) for k, v in np.load(case["inputs"]).items()}
  with torch.no_grad():
    logits = model(**inp).logits.float().numpy()
    active = str(model.active_adapters)
    model.set_active_adapters(None)            # the base model, to show the adapter acts
    base = model(**inp).logits.float().numpy()
  np.savez(os.path.join(workdir, f"{case['id']}.npz"), logits=logits, base_logits=base)
  with open(os.path.join(workdir, f"{case['id']}.json"), "w") as f:
    json.dump({"trainable": int(trainable), "locations": locations, "active": active,
               "versions": {"adapters": adapters.__version__, "transformers": transformers.__version__,
                            "torch": torch.__version__}}, f)


def main(workdir):
  torch.manual_seed(0)
  with open(os.path.join(workdir, "cases.json")) as f:
    cases = json.load(f)
  for case in cases:
    run_case(case, workdir)
  print(f"adapterhub_ref: {len(cases)} cases done")


if __name__ == "__main__":
  main(sys.argv[1])
