"""The ``step`` console script.

Every subcommand lives in its own module, which exposes ``configure(parser)`` and
``run(args) -> int``; ``args.command_path`` holds the command's words (e.g.
``("train", "policy")``) for modules that serve several commands. The ``pipelines``
commands build both from one typed settings model through
:class:`pipelines.cli.command.Command` (``--config``, ``--set``, generated flags,
``--json``, error lines).
Modules are imported only when their command is chosen, so ``step --help`` stays instant
and a broken optional dependency of one command cannot break the others. Command modules
keep heavy imports (torch, ray, mlflow) inside their handlers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# (command path) -> (module, one-line help)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("prep",): ("pipelines.cli.prep", "shard a segmentation dataset into WebDataset tars (Ray Data)"),
    ("train", "policy"): ("pipelines.cli.train", "stage 1: train the dCTS policy network (Ray Train)"),
    ("train", "step"): ("pipelines.cli.train", "stage 2: train the STEP segmenter (Ray Train)"),
    ("eval",): ("pipelines.cli.eval", "evaluate a checkpoint: mIoU and compute figures"),
    ("predict",): ("pipelines.cli.predict", "apply a checkpoint or registered model to images: masks, token maps (JSON summary)"),
    ("analyze",): ("pipelines.cli.analyze", "where tokens go: layout ceilings, policy vs oracle, trade-off, exit ablation, flow"),
    ("tune",): ("pipelines.cli.tune", "search exit/merge thresholds under an mIoU-drop limit (Ray Tune)"),
    ("run",): ("pipelines.cli.run", "run the whole pipeline: prep -> policy -> STEP -> tune -> eval -> report -> analyze"),
    ("submit",): ("pipelines.cli.submit", "submit the pipeline to a Ray cluster as a Ray job"),
    ("ui",): ("pipelines.cli.ui", "start the MLflow UI on 127.0.0.1 over the embedded store"),
    ("bench", "model"): ("pipelines.cli.bench_model", "plain ViT vs STEP: GFLOPs, tokens, latency (JSON)"),
    ("bench", "data"): ("pipelines.cli.bench_data", "shard writing and loader throughput, local (and S3 when asked) (JSON)"),
    ("bench", "train"): ("pipelines.cli.bench_train", "training samples/s, plain vs STEP (JSON)"),
    ("bench", "gpu"): ("pipelines.cli.bench_gpu", "GPU readiness: bf16/NCCL training, varlen kernels, model bench (JSON)"),
}


def _groups() -> dict[str, list[tuple[str, ...]]]:
    groups: dict[str, list[tuple[str, ...]]] = {}
    for path in COMMANDS:
        groups.setdefault(path[0], []).append(path)
    return groups


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="step",
        description="STEP: SuperToken and Early-Pruning ViTs for high-resolution segmentation.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, paths in _groups().items():
        if len(paths) == 1 and len(paths[0]) == 1:
            sub.add_parser(name, help=COMMANDS[paths[0]][1], add_help=False)
        else:
            helps = ", ".join(p[1] for p in paths)
            sub.add_parser(name, help=f"{{{helps}}}", add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    groups = _groups()
    if not argv or argv[0] not in groups:
        _top_parser().parse_args(argv or ["--help"])
        return 2
    name = argv[0]
    paths = groups[name]
    if len(paths[0]) == 1:
        path, rest = paths[0], argv[1:]
    else:
        parser = argparse.ArgumentParser(prog=f"step {name}")
        sub = parser.add_subparsers(dest="sub", metavar="SUBCOMMAND", required=True)
        for p in paths:
            sub.add_parser(p[1], help=COMMANDS[p][1], add_help=False)
        if len(argv) < 2 or argv[1] not in {p[1] for p in paths}:
            parser.parse_args(argv[1:2] or ["--help"])
            return 2
        path, rest = (name, argv[1]), argv[2:]
    module_name, help_text = COMMANDS[path]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog="step " + " ".join(path), description=help_text)
    module.configure(parser)
    args = parser.parse_args(rest)
    args.command_path = path
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
