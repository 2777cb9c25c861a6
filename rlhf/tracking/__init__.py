"""Tracking: W&B runs per stage, the console, the offline `.wandb` reader, upload, and the sweep report.

Tracking logs what it is given: nothing here imports the algorithm or the stages.

wandb_run.py      StageTracker: one W&B run per stage (offline by default), config, metrics, lineage
console.py        the progress bar and the compact line per logged step
wandb_offline.py  a reader for offline `.wandb` files (history without a server)
wandb_sync.py     `rlhf-sync`: upload a run's or sweep's offline W&B runs
report.py         `rlhf-report` and the multirun callback: the sweep's table, CSV and plot
report_plot.py    the sweep report's plot: reward against KL per setting
"""
