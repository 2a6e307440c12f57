"""`medflow` command line: one sub-command per pipeline step, each calling that step's ``run`` entry.

dvc.yaml calls these with explicit paths (the one place paths are written down); ``medflow STEP --help``
lists each step's arguments.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tasks.config import DEFAULT_PARAMS, ConfigError, load_config
from tasks.errors import StepError

log = logging.getLogger("medflow")


# step name -> (module, help, [(flag, help)]) ; every flag is a path
STEPS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "download": (
        "tasks.download",
        "fetch remote sources (resumable, verified), resolve local and inbox ones; write sources.json",
        [("--out-dir", "folder for downloaded archives"), ("--sources-json", "resolved sources (output)"),
         ("--inbox", "folder whose archives and folders are added to the sources")],
    ),
    "extract": (
        "tasks.extract",
        "safely unpack archives (no path escapes, links, bombs or OS junk); write roots.json",
        [("--sources-json", "resolved sources (input)"), ("--out-dir", "folder for extracted archives"),
         ("--roots-json", "image roots to index (output)")],
    ),
    "manifest": (
        "tasks.manifest",
        "index every image: path, class, label, patient id, source split, sha256, size, mode, format",
        [("--roots-json", "image roots (input)"), ("--out", "manifest CSV (output)")],
    ),
    "filter": (
        "tasks.filter",
        "decode every image; quarantine corrupt ones, drop exact duplicates, group near duplicates",
        [("--manifest", "manifest CSV (input)"), ("--clean", "clean manifest CSV (output)"),
         ("--rejects", "rejects CSV, one reason per file (output)"),
         ("--summary", "filter summary JSON (output)"), ("--cache", "decode cache folder (persistent)")],
    ),
    "resize": (
        "tasks.resize",
        "resize clean images in parallel into one uint8 array (N, size, size, channels)",
        [("--clean", "clean manifest CSV (input)"), ("--out", "images .npy (output)"),
         ("--stats", "resize statistics JSON (output)"), ("--cache", "content-addressed cache folder")],
    ),
    "split": (
        "tasks.split",
        "seeded train/val/test split grouped by patient and near-duplicate group, stratified by label",
        [("--clean", "clean manifest CSV (input)"), ("--out", "split manifest CSV (output)")],
    ),
    "validate": (
        "tasks.validate",
        "Great Expectations suite on the split manifest and resized images; fails on any violation",
        [("--split", "split manifest CSV (input)"), ("--images", "images .npy (input)"),
         ("--result", "validation result JSON (output)"), ("--summary", "readable summary Markdown (output)")],
    ),
    "train": (
        "tasks.train",
        "train a Keras 3 classifier on the train split, selecting on val (resumes a killed run)",
        [("--images", "images .npy (input)"), ("--split", "split manifest CSV (input)"),
         ("--model-dir", "model folder: model.keras, metadata.json, history.csv, checkpoints/ (output)"),
         ("--live-dir", "DVCLive folder: per-epoch metrics and plots (output)")],
    ),
}


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medflow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, (_, help_text, flags) in STEPS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
        for flag, flag_help in flags:
            p.add_argument(flag, type=Path, required=True, help=flag_help)
    return parser


def _entry(step: str) -> Callable[..., Any]:
    module = importlib.import_module(STEPS[step][0])
    return module.run  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    paths = {k: v for k, v in vars(args).items() if k not in {"step", "params", "verbose"}}
    try:
        cfg = load_config(args.params)
        _entry(args.step)(cfg, **paths)
    except (ConfigError, StepError) as e:
        print(f"medflow {args.step}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
