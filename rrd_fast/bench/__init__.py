"""Benchmarks, one command line:

    python -m rrd_fast.bench train      # training step vs student-only limit, pipeline vs per-sample loader
    python -m rrd_fast.bench memory     # the RRD memory across processes: bytes per rank, loss and step time
    python -m rrd_fast.bench cache      # distilling from the teacher cache vs the online teacher
    python -m rrd_fast.bench pipelines  # torch vs DALI vs per-sample DataLoader; writes the auto-backend table
    python -m rrd_fast.bench compile    # eager vs compiled steps, compile time, start-up with a warm kernel cache
    python -m rrd_fast.bench methods    # every method's step against the student-only step, online and cached
    python -m rrd_fast.bench threads    # launchers x threads x OpenMP wait policy, idle and beside a competing run
    python -m rrd_fast.bench cache-dtype  # does an fp16/bf16 teacher cache change results? (seeds, trajectories)
    python -m rrd_fast.bench reliability  # fault injection: kills, bad input, corrupt files; a table of trials

Each subcommand lives in its own module; `common` holds what they share. Importing this
package imports nothing heavy: `__main__` restarts the process with the malloc tunables
before torch is loaded.
"""
