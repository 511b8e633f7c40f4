"""Memories that relational losses (RRD, CRD) compare against, registered by (kind, sharding mode).

`base` holds the interface and the registry; each other module is one kind of memory and
registers itself when imported here: `fifo` (RRD's queue, one copy per process), `fifo_sharded`
(the queue split across or replicated over processes), `momentum` (CRD-style banks for RRD),
`contrast` (CRD's own NCE memory on the same banks). `collectives` are the autograd-aware
all-gathers and reductions they share.
"""

from rrd_fast.memory.base import (Memory, MemorySettingError, MemorySpec, RowShard, build_memory, random_rows,
                                  register_memory, soft_target_cross_entropy, unit_rows)
from rrd_fast.memory import fifo, fifo_sharded, momentum, contrast  # noqa: F401,E402  (registration)
from rrd_fast.memory.fifo import FifoQueue  # noqa: E402

__all__ = ["FifoQueue", "Memory", "MemorySettingError", "MemorySpec", "RowShard", "build_memory", "random_rows",
           "register_memory", "soft_target_cross_entropy", "unit_rows"]
