"""Data side of rrd-fast: on-disk format readers, augmentation, and batch pipelines.

Nothing here imports `rrd_fast` or `export`.
"""
