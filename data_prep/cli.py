"""``step prep``: shard a segmentation dataset into WebDataset tars with Ray Data."""

from __future__ import annotations

import argparse
import json
import sys

DATASETS = ("ade20k", "cityscapes", "coco_stuff", "loveda", "folder")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", required=True, choices=DATASETS)
    parser.add_argument("--src", required=True, help="dataset root: local path or s3://bucket/prefix")
    parser.add_argument("--out", required=True, help="shard directory: local path or s3://bucket/prefix")
    parser.add_argument("--split", default="train", help="split to shard (default: train)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--samples-per-shard", type=int, default=None, metavar="N")
    size.add_argument("--shard-size", default=None, metavar="SIZE",
                      help="target shard size in source bytes, e.g. 512MB (the default)")
    parser.add_argument("--max-side", type=int, default=None, metavar="N",
                        help="downscale images whose long side exceeds N (labels: nearest)")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first bad pair instead of skipping it and listing it "
                             "in OUT/skipped.parquet")
    parser.add_argument("--layout", default=None, metavar="FILE.yaml",
                        help="layout description for --dataset folder")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide Ray Data's progress bar")


def run(args: argparse.Namespace) -> int:
    from data_prep import storage
    from data_prep.prep import PrepError, prepare
    from data_prep.readers import DatasetError

    try:
        report = prepare(
            args.dataset, args.src, args.out, args.split,
            samples_per_shard=args.samples_per_shard, shard_size=args.shard_size,
            max_side=args.max_side, strict=args.strict, layout=args.layout,
            progress=not args.no_progress,
        )
    except (DatasetError, PrepError, ValueError) as err:
        print(f"step prep: error: {err}", file=sys.stderr)
        return 2
    summary = report.to_dict()
    skipped = str(report.skipped_total)
    if report.skipped_total:
        reasons = ", ".join(f"{k}={v}" for k, v in report.skipped.items())
        skipped += f" ({reasons}; see {report.skipped_file})"
    print(
        f"step prep: {report.dataset}/{report.split}: read {report.read}, written {report.written}, "
        f"skipped {skipped}; {len(report.shards)} shards ({report.shards_written} written, "
        f"{report.shards_reused} verified and kept) in {report.out} ({report.seconds:.1f} s)"
    )
    for reason, example in report.examples.items():
        print(f"  e.g. {reason}: {example}")
    if args.json:
        storage.write_bytes(args.json, json.dumps(summary, indent=1).encode())
    return 0
