"""``bench.py``: the smoke variant end to end (both sides, the ratios, the tables, the PNG,
the JSON last line), the config's checks, and the plan column against ``--plan`` itself.
No assertion on speed."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from peft_jax.bench import config as bench_config
from peft_jax.config_lib import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = "configs/bench.py:smoke"


def _env():
  env = {k: v for k, v in os.environ.items() if not k.startswith("XLA_FLAGS")}
  env.setdefault("JAX_PLATFORMS", "cpu")
  return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  pytest.importorskip("peft")
  out = tmp_path_factory.mktemp("bench")
  page = out / "benchmarks.md"
  proc = subprocess.run([sys.executable, "bench.py", f"--config={SMOKE}", f"--out={page}"],
                        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  lines = proc.stdout.strip().splitlines()
  return json.loads(lines[-1]), proc.stdout, page


def test_smoke_rows_have_both_sides_and_ratios(smoke):
  result, _, _ = smoke
  assert set(result) >= {"rows", "machine", "load"}
  assert [(r["model"], r["method"]) for r in result["rows"]] == [("t5", "lora"), ("llama", "lora")]
  for r in result["rows"]:
    assert "error" not in r, r.get("error")
    assert r["reference"] == "peft"
    j, h = r["peft_jax"], r["hf_peft"]
    for side in (j, h):
      assert side["train_tokens_per_s"] > 0 and side["infer_tokens_per_s"] > 0
      assert side["infer_merged_tokens_per_s"] > 0
      assert side["peak_train_mb"] > 0
      assert len(side["train_block_s"]) == result["run"]["blocks"]
      run = result["run"]   # every turn began with its untimed steps
      assert side["train_steps_done"] == run["warmup_steps"] + run["blocks"] * (
          run["steps_per_block"] + run["block_warmup"])
    for k in ("ratio_train", "ratio_infer", "ratio_infer_merged", "ratio_memory"):
      assert r[k] > 0, k
    # the same weights: equal counts, equal first losses (fp32, batch 0 without dropout)
    assert j["trainable_params"] == h["trainable_params"] > 0
    assert r["loss_diff"] < 1e-4
    assert j["compile_s"] > 0 and j["plan"]["peak_bytes"] > 0
    assert j["infer_new_tokens"] == h["infer_new_tokens"] == result["run"]["new_tokens"]
  assert result["machine"]["cores"] >= 1
  assert len(result["load"]["loadavg_start"]) == 3 and result["load"]["loadavg_1min"]


def test_smoke_tables_page_and_png(smoke):
  result, stdout, page = smoke
  assert "| model | method | HF side |" in stdout
  assert "| t5 | lora | HF PEFT |" in stdout and "| llama | lora | HF PEFT |" in stdout
  text = page.read_text()
  assert "python bench.py --config=configs/bench.py:smoke" in text
  assert "| t5 | lora | HF PEFT |" in text and "load average" in text
  png = page.with_suffix(".png")
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert f"![ratios]({png.name})" in text


def test_plan_column_is_the_plans_estimate(smoke, tmp_path):
  """The bench's plan figure equals ``--plan``'s (peft_jax.plan.plan) for the same row."""
  from peft_jax.plan import plan
  result, _, _ = smoke
  bench = bench_config.load(SMOKE)
  ckpt = tmp_path / "ckpt"
  ckpt.mkdir()
  hf = dict(bench_config.hf_config_dict(bench["models"]["llama"]), model_type="llama")
  (ckpt / "config.json").write_text(json.dumps(hf))
  run = bench["run"]
  total = (run["warmup_steps"] + 1 +
           run["blocks"] * (run["steps_per_block"] + run["block_warmup"]))
  cfg = bench_config.train_config(bench, "llama", "lora", str(ckpt), total)
  row = [r for r in result["rows"] if r["model"] == "llama"][0]
  assert plan(cfg)["peak_bytes"] == row["peft_jax"]["plan"]["peak_bytes"]


# ----------------------------------------------------------------------------- the config

def test_default_and_gpu_variants_resolve():
  b = bench_config.load("configs/bench.py")
  assert list(b["models"]) == ["t5", "llama"]
  assert list(b["methods"]) == ["lora", "ia3", "houlsby", "prefix_tuning", "full"]
  assert b["models"]["t5"]["hf_config"]["d_model"] == 512
  assert b["models"]["llama"]["source_len"] + b["models"]["llama"]["target_len"] == 256
  assert bench_config.reference(b, "lora")[0] == "peft"
  assert bench_config.reference(b, "full")[0] == "torch"
  g = bench_config.load("configs/bench.py:gpu")
  assert g["run"]["dtype"] == "bfloat16" and g["models"]["t5"]["hf_config"]["num_layers"] == 24
  assert {"lora_qv", "houlsby", "compacter", "unipelt", "full"} <= set(g["methods"])
  assert bench_config.reference(g, "compacter")[0] is None     # peft-jax alone


def test_overrides_are_typed_and_checked():
  b = bench_config.load(SMOKE, [("run.blocks", "5"), ("models.t5.num_layers", "3"),
                                ("methods.lora.lora_dropout", "0.1"), ("run.methods", "lora,full")])
  assert b["run"]["blocks"] == 5 and b["models"]["t5"]["hf_config"]["num_layers"] == 3
  assert b["methods"]["lora"]["lora_dropout"] == 0.1 and list(b["methods"]) == ["lora", "full"]
  bad = [([("run.blocks", "0")], "run.blocks"),
         ([("run.blokcs", "2")], "did you mean 'blocks'"),
         ([("models.t5.num_layer", "2")], "did you mean 'num_layers'"),
         ([("models.t5.num_layers", "two")], "expected a int"),
         ([("methods.lora.rank", "4")], "has no hyperparameter 'rank'"),
         ([("run.methods", "lora,nope")], "not a methods section"),
         ([("methods.lora.r", "0")], "methods.lora.r"),
         ([("run.dtype", "float64")], "run.dtype")]
  for overrides, msg in bad:
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(")):
      bench_config.load(SMOKE, overrides)


def test_bad_command_line_is_one_error_line():
  proc = subprocess.run([sys.executable, "bench.py", f"--config={SMOKE}",
                         "--config.run.methods=lora,nope"], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: run.methods names 'nope'")
  assert proc.stdout == ""


def test_report_marks_missing_sides_and_failures(tmp_path):
  """Rows without an HF side, a failed row and a full row: tables, page and PNG say n/a."""
  from peft_jax.bench import report
  full = {"train_tokens_per_s": 100.0, "infer_tokens_per_s": 50.0, "peak_train_mb": 900.0,
          "trainable_params": 10, "loss0": 1.0, "compile_s": 2.0, "rss_base_mb": 100.0,
          "plan": {"peak_bytes": 2**29}, "plan_peak_mb": 512.0, "device": "cpu:cpu"}
  rows = [
      {"model": "t5", "method": "lora", "reference": "peft", "peft_jax": dict(full),
       "hf_peft": dict(full, train_tokens_per_s=50.0), "loss_diff": 1e-7, "ratio_train": 2.0,
       "ratio_infer": 1.0, "ratio_infer_merged": None, "ratio_memory": 1.0},
      {"model": "t5", "method": "compacter", "reference": None, "peft_jax": dict(full),
       "hf_peft": None, "ratio_train": None, "ratio_infer": None, "ratio_infer_merged": None,
       "ratio_memory": None},
      {"model": "t5", "method": "ia3", "reference": "peft", "peft_jax": {}, "hf_peft": {},
       "error": "hf: setup failed: boom", "ratio_train": None, "ratio_infer": None,
       "ratio_infer_merged": None, "ratio_memory": None}]
  result = {"rows": rows, "machine": {"cpu": "x", "cores": 2}, "seconds": 1.0, "date": "today",
            "load": {"loadavg_start": [1, 1, 1], "loadavg_end": [2, 2, 2],
                     "loadavg_1min": {"min": 1, "median": 1.5, "max": 2},
                     "other_processes_cores": None},
            "run": bench_config.load(SMOKE)["run"], "models": {}, "methods": {}}
  table = report.speed_table(result).splitlines()
  assert table[2].startswith("| t5 | lora | HF PEFT | 10 / 10 |") and "**2.00**" in table[2]
  assert table[3].startswith("| t5 | compacter | n/a | 10 / n/a |")
  assert table[4].count("n/a") >= 10
  mem = report.memory_table(result).splitlines()
  assert "| 800 | 512 | 0.64 |" in mem[2]       # growth over imports, plan, plan / growth
  text = report.page(result, "python bench.py --config=x", "r.png")
  assert "## Failed rows" in text and "t5 / ia3: hf: setup failed: boom" in text
  report.plot(result, str(tmp_path / "r.png"))
  assert (tmp_path / "r.png").stat().st_size > 1000
  assert json.loads(report.json_line(result))["rows"][1]["hf_peft"] is None
