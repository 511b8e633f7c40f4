"""Teacher feature cache: run the frozen teacher once over V augmented views of every
training sample, then distill at student-only speed, with results identical to running
the teacher online (fp32 cache) or equal to them within rounding (fp16, bf16; see below).

View v of sample i is the exact augmentation the train pipeline produces for
(seed, epoch=v, index=i). Training epoch e replays view e mod V: the pipeline
regenerates that view for the student (`aug_epoch`), and the teacher's stored outputs
for (index, view) are read from memory-mapped safetensors shards instead of running
the teacher.

Trade-off of V (default 32, `teacher.cache_views`): with more epochs than views, each
view is replayed about epochs / V times, so the student sees at most V distinct
crops/flips of a sample instead of a fresh draw every epoch; the sample order still
changes every epoch, and the cached and online runs see the same augmentation for V >= epochs.
CIFAR recipe: pad-4 crop + flip has 9*9*2 = 162 distinct views per sample, of which
240 online epochs draw about 125 distinct ones, V=32 views about 29 (~23%), for 32/240 =
13% of one online run's teacher FLOPs and 1.14 GB of fp16 storage (resnet32x4, 50k samples).
Raise V toward the epoch count for online-identical augmentation, lower it to save
build time and disk.

What "agrees with the online teacher" means for each `teacher.cache_dtype` (values are
stored rounded to nearest from the teacher's fp32 outputs and read back as fp32):
  fp32  Bit-identical: with the build running the teacher as the run does (CPU, the run's
        autocast, the build padding every forward pass to its full batch), the stored outputs
        are the online teacher's bit for bit, and a run from the cache repeats the online run
        exactly: every step's loss, the weights, top-1.
  fp16  (default) Every stored value within 2**-11 (0.049%) relative of the fp32 output where
        |x| >= 2**-14, within 2**-25 absolute below that; values beyond 65504 become inf, and
        the run then stops at its first non-finite loss. So KD's target softmax(t/T) moves by a
        factor within exp(+-2**-10 * max|t| / T) per class. The run differs from the online
        one from its first step, by rounding-sized amounts that grow exponentially like those
        of any perturbation that small: training is chaotic, so one short run's top-1 can land
        far from the online run's, while top-1 over seeds agrees with it within the seed spread
        (measured by `python -m rrd_fast.bench cache-dtype`, which also runs a random
        perturbation of fp16's rounding size as the control).
  bf16  The same with 2**-8 (0.39%) relative and fp32's range: 8 times fp16's rounding error
        for the same size, worth it only for outputs beyond fp16's range.
fp16 stays the default because its rounding is far below the differences between seeds
and 8 times finer than bf16's, at half of fp32's size; bf16's extra range buys nothing for
teacher outputs that fit in fp16.

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
