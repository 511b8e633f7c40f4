"""Teacher feature cache: run the frozen teacher once over V augmented views of every
training sample, then distill at student-only speed with results identical to running
the teacher online.

View v of sample i is the exact augmentation the train pipeline produces for
(seed, epoch=v, index=i). Training epoch e replays view e mod V: the pipeline
regenerates that view for the student (`aug_epoch`), and the teacher's stored outputs
for (index, view) are read from memory-mapped safetensors shards instead of running
the teacher.

Trade-off of V (default 32, `teacher.cache_views`): with more epochs than views, each
view is seen ceil(epochs / V) times, so the student sees at most V distinct crops/flips
of each sample instead of one per epoch. Sample order still changes every epoch. At the
CIFAR recipe (pad-4 crop + flip: 9*9*2 = 162 possible views per sample, 240 epochs)
V=32 keeps about 20% of the online augmentation diversity at 13% of the teacher FLOPs
of one online run, and the cache is 1.1 GB in fp16 for resnet32x4; raise V toward the
epoch count to recover online behaviour exactly (V >= epochs replays every epoch's own
view), lower it to save build time and disk.

Layout:
  manifest.json                          what the cache was built from, and per-shard size + sha256
  view-VVVV.rows-SSSSSSSS.safetensors    one shard: fields for samples [S, S + n) of view V
"""

from rrd_fast.cache.manifest import CACHE_FORMAT, CacheError, MANIFEST_NAME, read_manifest, run_key
from rrd_fast.cache.builder import build_cache, ensure_cache
from rrd_fast.cache.source import CachedTeacher, open_cached_teacher

__all__ = [
    "CACHE_FORMAT", "CacheError", "CachedTeacher", "MANIFEST_NAME", "build_cache", "ensure_cache",
    "open_cached_teacher", "read_manifest", "run_key",
]
