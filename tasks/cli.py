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
    _add_orchestration(sub)
    return parser


# --- orchestration commands (Prefect is imported only when one of them runs; steps never import it) ----
def _add_orchestration(sub: Any) -> None:
    p = sub.add_parser("server", help="start a local Prefect server (SQLite in $PREFECT_HOME, default .prefect/)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=4200, help="port (default: 4200)")
    p = sub.add_parser("serve", help="serve the train-<ds> and retrain-<ds> deployments of this checkout")
    p.add_argument("--project", type=Path, default=Path("."), help="project folder (default: .)")
    p = sub.add_parser("watch", help="poll the dataset's inbox; emit a medflow.data.landed event on new data")
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    p.add_argument("--project", type=Path, default=Path("."), help="project folder (default: .)")
    p.add_argument("--interval", type=float, default=None, help="seconds between polls (default: retrain.poll_s)")
    p.add_argument("--once", action="store_true", help="check once and exit (exit code 0 either way)")


def _orchestrate(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    if args.step == "server":
        os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
        exe = Path(sys.executable).parent / "prefect"
        os.execv(str(exe), [str(exe), "server", "start", "--host", args.host, "--port", str(args.port)])
    os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    if args.step == "serve":
        from flows.deploy import serve

        serve(args.project)
        return 0
    from flows.events import emit_data_landed
    from flows.stages import stage_flags
    from tasks.watch import watch

    project = args.project.resolve()
    cfg = load_config(project / args.params)
    flags = stage_flags(project, cfg.dataset.name)
    n = watch(cfg, flags["download"]["--inbox"], flags["train"]["--model-dir"],
              lambda payload: emit_data_landed(cfg.dataset.name, project, payload),
              interval_s=args.interval or cfg.retrain.poll_s, once=args.once)
    log.info("watch: %d data-landed event(s) emitted", n)
    return 0


def _entry(step: str) -> Callable[..., Any]:
    module = importlib.import_module(STEPS[step][0])
    return module.run  # type: ignore[no-any-return]


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.step in ("server", "serve", "watch"):
        return _orchestrate(args)
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
