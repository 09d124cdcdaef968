"""The run store: one directory per run, written incrementally and atomically, read by load_run().

    RUN/
      .balora-run    written first: marks the folder as balora's and lists what balora puts there
                     (--force deletes only those names; anything else in the folder stays)
      config.json    what was run: task, arms, seeds, steps, optimizer, lrs, alphas, rank, ..., "command"
      env.json       python/torch/peft/transformers/balora versions, device, cpu count, platform
      status.json    {"status": "running"|"completed"|"failed"|"interrupted", "started", "updated",
                      "finished" (ISO times, finished null while running), "message" (null or why it stopped),
                      "progress": {"done", "total"} (cells) + {"steps_done", "steps_total"}, "pid", "host"}
      steps/part-NNNNN.parquet     \
      layers/part-NNNNN.parquet     | tables, appended as new part files; columns below
      spectra/part-NNNNN.parquet    |
      summary/part-NNNNN.parquet   /

Every table starts with the cell key arm (string), seed (int64), lr (float64), alpha (float64):
  steps    step (1-based), loss (of the batch of that step, before its update), eval_loss (NaN when not
           evaluated), excess_loss (loss - best rank-r loss; NaN when unknown), time_s (cumulative training
           wall-clock of the cell: step + balancing, without diagnostics and eval), step_time_s (forward,
           backward, optimizer step), balance_time_s, diag_time_s (layer report + spectra), eval_time_s.
  layers   step (0 = before training, then every layers_every steps and the last step; after the update
           and the balancing of that step) + balora.REPORT_COLUMNS without the sigma lists.
  spectra  step, module, adapter, which ("dW" | "A" | "B"), index (0-based, descending), value.
           dW includes the LoRA scaling s. Written at step 0, every spectra_every steps and the last step.
  summary  one row per cell when it ends: status ("completed" | "diverged" | "failed" | "skipped" |
           "interrupted"), reason, steps_done, final_loss, min_loss, best_loss, final_excess_loss,
           final_eval_loss, final_rel_imbalance_max, target_loss, target_on ("loss" | "eval_loss"),
           steps_to_target, seconds_to_target (NaN when not reached), total_seconds, balance_seconds,
           diag_seconds, speedup_steps, speedup_seconds (the lora cell's steps/seconds to target divided by
           this cell's, for the lora cell of the same seed, lr and alpha; NaN when either did not reach it).

Atomicity: each part file and each JSON file is written under a temporary name in the same folder
and renamed into place, so a reader never sees half a file. A killed writer leaves complete parts
and a status that load_run reports as "running" with status_info["stale"] = True (the writing
process is gone, or `updated` is older than STALE_AFTER_S); Ctrl-C, SIGTERM and exceptions are
recorded as "interrupted" / "failed" by RunWriter's context manager. While a run is live, the writer
merges a table's newest parts of one size class into one (part-FIRST-LAST.parquet, named after the
parts it replaces, which are deleted after it is renamed into place; load_run skips parts a merged
part covers), so a live run is a few parts per table; when it finishes, each table's parts are merged
into one. Runs from versions before this (plain part names only) load as before, rows de-duplicated
in case their finish merge was cut short.

Damaged runs: status.json and config.json are read with balora.safe_io (regular files only, size cap)
and checked; odd contents raise RunError naming the file, and list_runs lists such a run as "damaged".

    layout      names, tables, the marker, run_version (a change token for caches)
    json_files  read_status / read_config, checked; RunError
    writer      RunWriter, clear_run (--force), write_json_atomic, environment_info
    reader      Run, load_run, list_runs
"""

from balora.store.json_files import RunError, read_config, read_status
from balora.store.layout import (CELL_STATUSES, CONFIG, ENV, HEARTBEAT_S, KEY_COLUMNS, MARKER, RUN_FILES,
                                 STALE_AFTER_S, STATUS, STATUSES, TABLES, UNIQUE, is_marked, is_run_dir,
                                 run_version, to_table)
from balora.store.reader import LIST_COLUMNS, Run, list_runs, load_run
from balora.store.writer import (RunFolderTaken, RunWriter, clear_run, environment_info, foreign_entries, now_iso,
                                 write_json_atomic)

__all__ = [
    "CELL_STATUSES", "CONFIG", "ENV", "HEARTBEAT_S", "KEY_COLUMNS", "LIST_COLUMNS", "MARKER", "RUN_FILES",
    "STALE_AFTER_S", "STATUS", "STATUSES", "TABLES", "UNIQUE", "Run", "RunError", "RunFolderTaken", "RunWriter", "clear_run",
    "environment_info", "foreign_entries", "is_marked", "is_run_dir", "list_runs", "load_run", "now_iso",
    "read_config", "read_status", "run_version", "to_table", "write_json_atomic",
]
