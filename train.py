"""Fine-tune T5 / LLaMA with a PEFT method from an ml-collections config.

  python train.py --config=configs/quickstart.py --workdir=/tmp/quickstart
  python train.py --config=configs/quickstart.py --config.peft.r=4 --config.train.num_steps=100
  python train.py --config=configs/quickstart.py --dry_run      # counts only, no weights, no data
  python train.py --config=configs/survey.py:t5-11b,lora --plan --cpu_devices=8  # memory plan
  python train.py --config=... --distributed    # one process per host (jax.distributed)
  python train.py --config=configs/quickstart.py --print_config   # every field, its value and doc

Any config field is set with --config.<section>.<field>=<value>; --config.peft.method=<m>
switches to method m with its defaults (then --config.peft.<hyperparameter>=... for m's own).

Compiled programs are cached on disk (peft_jax/compile_cache.py: $PEFT_JAX_CACHE_DIR, default
~/.cache/peft_jax/jax_cache; PEFT_JAX_COMPILATION_CACHE=0 turns it off).
"""

from __future__ import annotations

import json

from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_string("config", None, "configs/<file>.py[:<variant>]; set any field with "
                    "--config.<section>.<field>=<value> (sections model, data, peft, train, "
                    "eval, mesh; list every field with --print_config)")
flags.DEFINE_bool("print_config", False, "print the resolved config (every field with its "
                  "value and doc) and exit")
flags.DEFINE_string("workdir", None, "where metrics, TensorBoard logs and adapters are written")
flags.DEFINE_bool("dry_run", False, "build the parameter tree abstractly, print the parameter "
                  "table and, as the last line, a JSON object with the counts; no weights, no data")
flags.DEFINE_bool("plan", False, "compile the training step ahead of time on the configured "
                  "mesh for abstract inputs and print per-device memory (arguments, "
                  "temporaries, outputs) and FLOPs; no weights, no data (last line: JSON)")
flags.DEFINE_string("plan_topology", "", "plan on a real topology, e.g. v5e:2x4 (needs that "
                    "platform's compiler, e.g. libtpu); default: CPU devices")
flags.DEFINE_integer("cpu_devices", 0, "simulate this many CPU devices (a mesh on one machine)")
flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                  "jax.distributed.initialize() before anything else: on, off, or auto (on "
                  "when JAX_COORDINATOR_ADDRESS is set or on a multi-host TPU slice)")
flags.DEFINE_list("allow_changed", [], "config fields a resumed run may change from the run "
                  "that wrote the workdir's checkpoints, e.g. train.num_steps (to extend a run)")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (else detected)")
flags.DEFINE_integer("num_processes", None, "number of processes (else detected)")
flags.DEFINE_integer("process_id", None, "this process's index (else detected)")
flags.mark_flag_as_required("config")


def _setup_jax():
  """Device simulation and the distributed runtime, before any JAX computation."""
  import os
  import jax
  if FLAGS.cpu_devices:
    jax.config.update("jax_num_cpu_devices", FLAGS.cpu_devices)
  if FLAGS.plan_topology and "fibers_default_thread_stack_size" not in \
      os.environ.get("LIBTPU_INIT_ARGS", ""):
    # libtpu's compiler can overflow its default fiber stack on these deep scanned graphs
    os.environ["LIBTPU_INIT_ARGS"] = (os.environ.get("LIBTPU_INIT_ARGS", "") +
                                      " --fibers_default_thread_stack_size=67108864").strip()
  on = FLAGS.distributed == "on"
  if FLAGS.distributed == "auto":
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    on = bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or "," in hosts
  if on and not FLAGS.plan:
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu") or FLAGS.cpu_devices:
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes, process_id=FLAGS.process_id)


def main(argv):
  del argv
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from peft_jax import cli
  from peft_jax.trainer import Trainer

  cfg = cli.load_config(FLAGS.config)
  if FLAGS.print_config:
    from peft_jax.config_lib import describe as describe_config
    print(describe_config(cfg))
    return
  _setup_jax()
  if FLAGS.plan:
    from peft_jax.plan import format_plan, plan, topology_devices
    devices = topology_devices(FLAGS.plan_topology) if FLAGS.plan_topology else None
    res = plan(cfg, devices)
    print(format_plan(res))
    print(json.dumps(res))
    return
  if FLAGS.dry_run:
    from peft_jax.builder import build
    from peft_jax.peft import summary
    built = build(cfg)
    info = summary(built.state)
    print(info["table"])
    print(json.dumps({k: info[k] for k in ("total_params", "trainable_params", "changed_params",
                                           "base_params", "trainable_percent",
                                           "trainable_percent_of_base", "base_bytes")}
                     | {"method": cfg.peft.method}))
    return
  from peft_jax import compile_cache
  cache = compile_cache.enable()    # a second identical run loads its programs from disk
  res = Trainer(cfg, FLAGS.workdir, allow_changed=FLAGS.allow_changed).train()
  if cache is not None:
    res["compilation_cache"] = {"dir": cache, **compile_cache.stats()}
  if res.get("interrupted_at"):
    print(json.dumps(res))
    return
  m = res["metric"]
  if res["untuned"] is not None:
    print(f"untuned {m}: {res['untuned']:.4f}")
  print(f"tuned {m}: {res['tuned']:.4f}")
  print(json.dumps(res))


if __name__ == "__main__":
  from peft_jax.cli import run_cli
  run_cli(main)
