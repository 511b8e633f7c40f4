"""Benchmarks, one command line:

    python -m rrd_fast.bench train      # training step vs student-only limit, pipeline vs per-sample loader
    python -m rrd_fast.bench memory     # the RRD memory across processes: bytes per rank, loss and step time
    python -m rrd_fast.bench cache      # distilling from the teacher cache vs the online teacher
    python -m rrd_fast.bench pipelines  # torch vs DALI vs per-sample DataLoader; writes pipelines/auto_backend.json

Each subcommand lives in its own module; `common` holds what they share. Importing this
package imports nothing heavy: `__main__` restarts the process with the malloc tunables
before torch is loaded.
"""
