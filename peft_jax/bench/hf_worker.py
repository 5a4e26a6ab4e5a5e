"""The Hugging Face side of ``bench.py``: one process per (model, method), torch only.

Runs as a script (``python peft_jax/bench/hf_worker.py``) under the main venv (HF PEFT,
plain torch for full fine-tuning) or under the AdapterHub venv (``.venv-adapters``:
transformers 4.x with ``adapters``) for the bottleneck adapters; it never imports
peft_jax or JAX, so either interpreter can run it.

Protocol (shared with ``jax_worker``): one JSON command per line on stdin,
``{"op": name, "args": {...}}``, one JSON reply per line on the original stdout
(``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``); everything the libraries
print goes to stderr (the orchestrator's log file). The orchestrator sends the
commands in turns with the JAX worker, so only one of the two computes at a time.

Weights: the base model is the checkpoint both sides load; the method's initial
weights come from peft-jax (an exported HF PEFT adapter directory, or an ``.npz`` of
its bottleneck-adapter leaves copied into AdapterHub's modules), so the two sides
start from the same parameters and their first losses agree.

The training step mirrors peft-jax's: token cross entropy averaged over the target
mask, AdamW (betas 0.9 / 0.999, eps 1e-8, no weight decay, constant learning rate),
gradient norm clipped to 1.0. Generation is ``model.generate`` greedy with no EOS
stop, so every call makes exactly ``new_tokens`` tokens per row.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def maxrss_bytes() -> int:
  """The process's resident-memory high-water mark: Linux's ``VmHWM`` (of this program's
  own address space; ``ru_maxrss`` would carry over the parent's mark through fork and
  exec), else ``ru_maxrss``."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Side:
  """The torch model under test and its optimizer, batches and generation inputs."""

  def __init__(self):
    self.model = None

  # ------------------------------------------------------------------ setup
  def setup(self, checkpoint, family, reference, batches, learning_rate, dtype="float32",
            device="auto", threads=0, adapter_dir="", adapter_npz="", adapter_class="",
            adapter_kwargs=None, seed=0):
    import numpy as np
    import torch
    import transformers
    t_setup = time.perf_counter()
    if threads:
      torch.set_num_threads(int(threads))
    torch.manual_seed(seed)
    self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu")
    self.dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                  "float16": torch.float16}[dtype]
    self.family, self.reference = family, reference
    rss_base = maxrss_bytes() / 2**20
    t0 = time.perf_counter()
    model = _auto_class(transformers.AutoConfig.from_pretrained(checkpoint)).from_pretrained(
        checkpoint, torch_dtype=self.dtype)
    self.seq2seq = bool(model.config.is_encoder_decoder)
    model.generation_config.eos_token_id = None      # exactly new_tokens tokens per row
    if not self.seq2seq and model.generation_config.pad_token_id is None:
      model.generation_config.pad_token_id = 0
    if reference == "peft":
      model = _hf_peft(model, adapter_dir)
    elif reference == "adapterhub":
      model = self._adapterhub(model, adapter_npz, adapter_class, adapter_kwargs or {})
    elif reference != "torch":
      raise ValueError(f"unknown reference {reference!r}")
    self.model = model.to(self.device)
    self.load_s = time.perf_counter() - t0
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    data = np.load(batches)
    keys = sorted({k.split("/", 1)[1] for k in data.files})
    n = len({k.split("/", 1)[0] for k in data.files})
    self.batches = [{k: torch.from_numpy(data[f"{i}/{k}"].astype(np.int64)).to(self.device)
                     for k in keys} for i in range(n)]
    self.lr = float(learning_rate)
    loss0 = self._eval_loss(self.batches[0])
    total = sum(p.numel() for p in self.model.parameters())
    self.setup_s = time.perf_counter() - t_setup
    return {"setup_s": self.setup_s, "trainable_params": int(sum(p.numel() for p in self.params)),
            "total_params": int(total), "load_s": self.load_s, "loss0": loss0,
            "device": str(self.device), "rss_base_mb": rss_base,
            "rss_setup_mb": maxrss_bytes() / 2**20,
            "versions": _versions()}

  def _adapterhub(self, model, npz, class_name, kwargs):
    import adapters
    import numpy as np
    import torch
    adapters.init(model)
    name = "bench"
    model.add_adapter(name, config=getattr(adapters, class_name)(**kwargs))
    model.train_adapter(name)
    w = dict(np.load(npz))
    used = set()
    for (prefix, site, i), layer in _bottleneck_layers(model, self.seq2seq).items():
      if name not in layer.adapters:
        continue
      ad = layer.adapters[name]

      def get(leaf):
        key = f"{prefix}/adapter_{site}/{leaf}"
        used.add(key)
        return torch.from_numpy(np.ascontiguousarray(w[key][i]))

      down = [m for m in ad.adapter_down if isinstance(m, torch.nn.Linear)][0]
      with torch.no_grad():
        down.weight.copy_(get("down/kernel").T)
        down.bias.copy_(get("down/bias"))
        ad.adapter_up.weight.copy_(get("up/kernel").T)
        ad.adapter_up.bias.copy_(get("up/bias"))
        for side in ("before", "after"):
          if getattr(ad, f"add_layer_norm_{side}"):
            norm = getattr(ad, f"adapter_norm_{side}")
            norm.weight.copy_(get(f"ln_{side}/scale"))
            norm.bias.copy_(get(f"ln_{side}/bias"))
        if isinstance(ad.scaling, torch.nn.Parameter):
          ad.scaling.copy_(get("scaling").reshape(ad.scaling.shape))
    missing = sorted(k for k in w if k not in used and not k.endswith("/layer_on"))
    if missing:
      raise RuntimeError(f"AdapterHub has no adapter for peft-jax's {missing[:3]}")
    return model

  # ------------------------------------------------------------------ loss and training
  def _loss(self, batch):
    import torch
    if self.seq2seq:
      out = self.model(input_ids=batch["inputs"], attention_mask=batch["input_mask"],
                       decoder_input_ids=batch["decoder_inputs"])
    else:
      out = self.model(input_ids=batch["inputs"], attention_mask=batch["input_mask"])
    logits = out.logits[:, -batch["targets"].shape[1]:].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                            batch["targets"].reshape(-1), reduction="none")
    m = batch["target_mask"].reshape(-1).float()
    return (nll * m).sum() / m.sum().clamp(min=1.0)

  def _eval_loss(self, batch):
    import torch
    self.model.eval()
    with torch.no_grad():
      return float(self._loss(batch))

  def compile_train(self, warmup_steps=1):
    """Makes the optimizer and runs the warm-up steps (torch is eager: no compilation)."""
    import torch
    self.opt = torch.optim.AdamW(self.params, lr=self.lr, betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=0.0)
    self.model.train()
    self.step_i = 0
    self._sync()
    t0 = time.perf_counter()
    loss = None
    for _ in range(int(warmup_steps)):
      loss = self._step()
    self._sync()
    warmup = time.perf_counter() - t0
    return {"compile_s": None, "warmup_s": warmup, "first_loss": float(loss.detach()),
            "time_to_train_s": self.setup_s + warmup}

  def _step(self):
    import torch
    batch = self.batches[self.step_i % len(self.batches)]
    self.step_i += 1
    loss = self._loss(batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss

  def train(self, steps):
    self._sync()
    t0 = time.perf_counter()
    for _ in range(int(steps)):
      loss = self._step()
    loss = float(loss.detach())
    self._sync()
    return {"seconds": time.perf_counter() - t0, "loss": loss, "steps_done": self.step_i}

  # ------------------------------------------------------------------ generation
  def infer_setup(self, kind, new_tokens, prompt_len):
    """Prepares ``kind`` (``unmerged`` or ``merged``) and runs one warm-up generation."""
    if kind == "merged":
      if self.reference != "peft":
        raise ValueError("only HF PEFT adapters merge")
      self.model = self.model.merge_and_unload()
    self.model.eval()
    b = self.batches[0]
    self.gen_ids = b["inputs"][:, :prompt_len]
    self.gen_mask = b["input_mask"][:, :prompt_len]
    self.new_tokens = int(new_tokens)
    out = self.infer()
    out["warmup_s"] = out.pop("seconds")
    return out

  def infer(self):
    import torch
    self._sync()
    t0 = time.perf_counter()
    with torch.no_grad():
      out = self.model.generate(input_ids=self.gen_ids, attention_mask=self.gen_mask,
                                max_new_tokens=self.new_tokens, do_sample=False, num_beams=1)
    self._sync()
    seconds = time.perf_counter() - t0
    # a decoder's output starts with its start token; a causal model's with the prompt
    made = out.shape[1] - (1 if self.seq2seq else self.gen_ids.shape[1])
    return {"seconds": seconds, "new_tokens": int(made), "rows": int(out.shape[0])}

  # ------------------------------------------------------------------ memory
  def memory(self):
    import torch
    out = {"maxrss_mb": maxrss_bytes() / 2**20}
    if self.device.type == "cuda":
      out["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out

  def _sync(self):
    import torch
    if self.model is not None and self.device.type == "cuda":
      torch.cuda.synchronize()


def _hf_peft(model, adapter_dir):
  """The adapter of ``adapter_dir`` on ``model``, trainable. (``PeftModel.from_pretrained``
  refuses ``is_trainable`` for prompt-learning methods, so the model is made the way
  training starts, ``get_peft_model``, and the saved weights are loaded into it.)"""
  import peft
  from safetensors.torch import load_file
  conf = peft.PeftConfig.from_pretrained(adapter_dir)
  conf.inference_mode = False
  pm = peft.get_peft_model(model, conf)
  weights = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
  res = peft.set_peft_model_state_dict(pm, weights)
  # prompt learning loads ``prompt_embeddings`` into its encoder after the model's own
  # (non-strict) load, which lists it as unexpected
  left = [k for k in res.unexpected_keys if k != "prompt_embeddings"]
  if left:
    raise RuntimeError(f"HF PEFT did not take the adapter weights {left[:3]}")
  return pm


def _bottleneck_layers(model, seq2seq):
  """``(our stack prefix, site, layer) -> AdapterHub bottleneck layer`` for every sub-layer."""
  out = {}
  if seq2seq:
    for prefix, stack in (("encoder/layers", model.encoder), ("decoder/layers", model.decoder)):
      for i, block in enumerate(stack.block):
        if stack.is_decoder:
          out[(prefix, "self_attn", i)] = block.layer[0]
          out[(prefix, "cross_attn", i)] = block.layer[1]
        else:
          out[(prefix, "attn", i)] = block.layer[0]
        out[(prefix, "mlp", i)] = block.layer[-1]
  else:
    for i, layer in enumerate(model.model.layers):
      out[("layers", "attn", i)] = layer.attention_adapters
      out[("layers", "mlp", i)] = layer.output_adapters
  return out


def _versions():
  import torch
  import transformers
  out = {"torch": torch.__version__, "transformers": transformers.__version__}
  for name in ("peft", "adapters"):
    try:
      out[name] = __import__(name).__version__
    except ImportError:
      pass
  return out


def _auto_class(hf_config):
  """transformers' auto class for a config: sequence-to-sequence or causal LM."""
  import transformers
  return (transformers.AutoModelForSeq2SeqLM if hf_config.is_encoder_decoder
          else transformers.AutoModelForCausalLM)


def make_checkpoint(family, config, out_dir, seed=0, dtype="float32"):
  """A random-weight ``transformers`` model of ``config`` (``family`` is its model_type)
  saved in ``out_dir``."""
  import torch
  import transformers
  torch.manual_seed(seed)
  # built on the accelerator where there is one: LLaMA-2-7B's random init takes minutes on
  # a CPU and seconds on a GPU
  cfg = transformers.AutoConfig.for_model(family, **config)
  with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = _auto_class(cfg).from_config(cfg)
  dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
  model.to(dt).save_pretrained(out_dir)
  n = sum(p.numel() for p in model.parameters())
  return {"dir": out_dir, "params": int(n)}


def serve(handlers):
  """Answers JSON-line commands on stdin; replies on the original stdout only."""
  proto = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)                      # library prints go to the log, not the protocol
  sys.stdout = sys.stderr
  for line in sys.stdin:
    if not line.strip():
      continue
    cmd = json.loads(line)
    if cmd["op"] == "quit":
      proto.write(json.dumps({"ok": True}) + "\n")
      break
    try:
      reply = json.dumps({"ok": True, **handlers[cmd["op"]](**cmd.get("args", {}))})
    except Exception as e:   # reported to the orchestrator, which records the row as failed
      traceback.print_exc()
      reply = json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"[:2000]})
    proto.write(reply + "\n")


def main():
  side = Side()
  serve({"setup": side.setup, "compile_train": side.compile_train, "train": side.train,
         "infer_setup": side.infer_setup, "infer": side.infer, "memory": side.memory,
         "make_checkpoint": make_checkpoint})


if __name__ == "__main__":
  main()
