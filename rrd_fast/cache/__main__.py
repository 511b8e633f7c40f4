"""Teacher cache commands.

    python -m rrd_fast.cache build --config CFG [--rebuild-cache] [key=value ...]
    python -m rrd_fast.cache verify CACHE_DIR

Its benchmark is `python -m rrd_fast.bench cache`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rrd_fast.cli import run_cli


def _build(args: argparse.Namespace) -> int:
    from rrd_fast.cache.builder import build_cache
    from rrd_fast.config import load_config

    cfg = load_config(args.config, args.overrides)
    manifest = build_cache(cfg, rebuild=args.rebuild_cache)
    size = sum(e["bytes"] for e in manifest["shards"].values())
    layout = manifest["layout"]
    print(f"{cfg.teacher.cache}: complete, {layout['views']} views × {layout['num_samples']} samples, "
          f"fields {manifest['fields']}, {manifest['key']['dtype']}, {size / 2**20:.1f} MiB")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from rrd_fast.cache.manifest import CacheError, read_manifest
    from rrd_fast.cache.shards import CacheReader

    manifest = read_manifest(args.cache_dir)
    if manifest is None:
        raise CacheError(f"{args.cache_dir}: no manifest.json here")
    reader = CacheReader(args.cache_dir, manifest, verify=True, max_views=1)
    for view in range(reader.views):
        reader.gather(view, [0])  # maps (and so checksums) every shard of the view
    reader.close()
    print(f"{args.cache_dir}: {len(manifest['shards'])} shards verified (size and sha256)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rrd_fast.cache",
                                     description="Build and verify teacher caches "
                                                 "(benchmark: python -m rrd_fast.bench cache).")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="run the teacher over V views of the training set and store its outputs")
    build.add_argument("--config", type=Path, help="YAML run config (teacher.cache names the folder)")
    build.add_argument("--rebuild-cache", action="store_true",
                       help="discard an existing cache, even one built for another run")
    build.add_argument("overrides", nargs="*", help="key.path=value overrides, as for train.py")
    build.set_defaults(fn=_build)
    verify = sub.add_parser("verify", help="check every shard's size and sha256 against the manifest")
    verify.add_argument("cache_dir", type=Path)
    verify.set_defaults(fn=_verify)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(run_cli(main))
