"""The run layer: one `rlhf` command from composed config to `summary.json`.

validation.py   every check of the config and inputs, before any training
plan.py         which stages run, resume or are reused, by their stage keys
pipeline.py     the stage loop (lock, plan, run or reuse each stage, record)
summary.py      the `summary.json` format, read and written in one place
hydra_job.py    the Hydra job this run is (name, overrides, sweep) and its records
stage_keys.py   what a stage's output depends on (config, inputs, code, libraries)
stage_cache.py  stage outputs shared across a sweep, reused only when the key matches
lock.py         one run per run directory
sweep.py        multirun records: swept keys and values
"""
