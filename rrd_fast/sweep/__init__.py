"""Sweeps: a grid of teacher/student pairs x methods x seeds, trained as ordinary run folders,
resumable, run locally, N at once or through submitit, optionally probed on STL-10 /
Tiny-ImageNet (`transfer:`), and reported against the paper.

    python -m rrd_fast.sweep configs/sweeps/cifar100_paper.yaml [--only pair=... method=... seed=...] [--dry-run]
    python -m rrd_fast.sweep report SWEEP_DIR

Modules: spec (the sweep file), plan (its run folders and their state), driver (a whole
sweep), runner (in-process and --parallel executors), worker (one run per process), slurm
(submitit jobs), acceptance (teachers against teacher_min_top1), status (each run's outcome),
probes (the transfer section's linear probes, one job each), published (the paper's tables),
report (results.json, .md, .csv, .png) and transfer_report (its transfer table). Importing
this package loads none of them.
"""
