"""Teacher feature cache: run the frozen teacher once over V augmented views of every
training sample, then distill at student-only speed with results identical to running
the teacher online.

View v of sample i is the exact augmentation the train pipeline produces for
(seed, epoch=v, index=i). Training epoch e replays view e mod V: the pipeline
regenerates that view for the student (`aug_epoch`), and the teacher's stored outputs
for (index, view) are read from memory-mapped safetensors shards instead of running
the teacher.

Trade-off of V (default 32, `teacher.cache_views`): with more epochs than views, each
view is replayed about epochs / V times, so the student sees at most V distinct
crops/flips of a sample instead of a fresh draw every epoch; the sample order still
changes every epoch, and the cached and online runs agree exactly for V >= epochs.
CIFAR recipe: pad-4 crop + flip has 9*9*2 = 162 distinct views per sample, of which
240 online epochs draw about 125 distinct ones, V=32 views about 29 (~23%), for 32/240 =
13% of one online run's teacher FLOPs and 1.14 GB of fp16 storage (resnet32x4, 50k samples).
Raise V toward the epoch count for online-identical augmentation, lower it to save
build time and disk.

Layout:
  manifest.json                          what the cache was built from, and per-shard size + sha256
  view-VVVV.rows-SSSSSSSS.safetensors    one shard: fields for samples [S, S + n) of view V
"""

from rrd_fast.cache.manifest import CACHE_FORMAT, CacheError, MANIFEST_NAME, read_manifest, run_key
from rrd_fast.cache.builder import CacheTooLarge, build_cache
from rrd_fast.cache.source import CachedTeacher, open_cached_teacher

__all__ = [
    "CACHE_FORMAT", "CacheError", "CacheTooLarge", "CachedTeacher", "MANIFEST_NAME", "build_cache",
    "open_cached_teacher", "read_manifest", "run_key",
]
