"""Hyper-parameter sweep over train.py: grid x seeds, resumable, then mean ± 2 std per point.

  python sweep.py --config=configs/quickstart.py --workdir=runs/sweep1 \
      --grid train.learning_rate=1e-3,3e-3 --grid peft.r=4,8 --seeds=0,1,2 \
      --set config.train.num_steps=100 --select_split=none   # quickstart has no test split
  python sweep.py --config=configs/superni.py:lora --workdir=runs/superni --use_config_grid
  python sweep.py --workdir=runs/sweep1 --aggregate_only      # summary.md/json + plot again
  python sweep.py --report=runs/superni_lora,runs/superni_adapter --report_out=runs/report
      # the papers' tables and figures (report.md/json, PNGs; see peft_jax/report.py)

Each point runs in <workdir>/<point-name>/seed<k>; a point with result.json is skipped,
a failed one leaves failed.json (stderr tail) and is rerun next time. Then eval.py
evaluates the point's best checkpoint on validation on --select_split (default test)
into <split>.json, once. The summary reports that score with the validation score of the
same checkpoints; diverged runs (exit status 3) count as 0 and are counted per point.
Writes summary.json, summary.md and metric_vs_<x>.png (see peft_jax/grid_search.py).
Every point's train.py and eval.py share the persistent compilation cache
(peft_jax/compile_cache.py): the seeds of a point, and the programs a grid value leaves
unchanged (evaluation, for a learning-rate grid), are compiled once.
"""

import sys

from peft_jax.grid_search import main

if __name__ == "__main__":
  sys.exit(main())
