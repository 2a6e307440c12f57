"""`medflow` command line: one sub-command per pipeline step, each calling that step's ``run`` entry.

dvc.yaml calls these with explicit paths (the one place paths are written down) and ``--dataset NAME``, a
dataset of the catalog (``datasets/NAME.yaml``, merged over params.yaml's shared defaults); ``medflow STEP
--help`` lists each step's arguments. A self-contained params file (its own ``dataset:`` block) passed with
``--params`` and no ``--dataset`` works too, as step tests and benchmarks write them.

Library commands (``predict``, ``evaluate --images``) work anywhere. Step and orchestration commands load
``tasks/<step>.py`` and ``flows/`` from the project root (the nearest folder above the working directory
holding ``dvc.yaml`` and ``tasks/``), as dvc and kedro find theirs; outside a project they say so.
"""

from __future__ import annotations

import os

_STARTED_BY = os.getppid()  # read first: the parent to die with (medflow.lifeline), before the slow imports

import argparse  # noqa: E402
import atexit  # noqa: E402
import contextlib  # noqa: E402
import errno  # noqa: E402
import importlib  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import yaml  # noqa: E402

from medflow.catalog import load_yaml  # noqa: E402
from medflow.config import DEFAULT_PARAMS, Config, ConfigError, changed_params, load_config  # noqa: E402
from medflow.errors import StepError  # noqa: E402
from medflow.io import STORE_INDEX, remove_stale_temps  # noqa: E402

log = logging.getLogger("medflow")


# step name -> (module, help, [(flag, help)]) ; every flag is a path, required unless in OPTIONAL_FLAGS
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
        [("--roots-json", "image roots (input)"), ("--out", "manifest CSV (output)"),
         ("--cache", "digest cache folder (persistent): files whose size, mtime and inode it knows are not read")],
    ),
    "filter": (
        "tasks.filter",
        "decode every image; quarantine corrupt ones, drop exact duplicates, group near duplicates",
        [("--manifest", "manifest CSV (input)"), ("--clean", "clean manifest CSV (output)"),
         ("--rejects", "rejects CSV, one reason per file (output)"),
         ("--summary", "filter summary JSON (output)"), ("--cache", "decode cache folder (persistent)"),
         ("--roots-json", "image roots (input): where the paths under a source root outside the project lie")],
    ),
    "resize": (
        "tasks.resize",
        "resize clean images in parallel into an image store, uint8 (N, size, size, channels)",
        [("--clean", "clean manifest CSV (input)"), ("--out", "the image store, published (output folder)"),
         ("--stats", "resize statistics JSON (output)"), ("--cache", "the image store (persistent folder)"),
         ("--rejects", "images the filter passed that cannot be decoded now, with their row (output)"),
         ("--roots-json", "image roots (input): where the paths under a source root outside the project lie")],
    ),
    "split": (
        "tasks.split",
        "seeded train/val/test split grouped by patient and near-duplicate group, stratified by label",
        [("--clean", "clean manifest CSV (input)"),
         ("--resize-rejects", "the resize step's rejects CSV (input): rows quarantined, in no split"),
         ("--out", "split manifest CSV (output; its previous version is extended when the params are unchanged)"),
         ("--summary", "split summary JSON: counts and the split params it was made with (output)"),
         ("--rejects", "the split's quarantine CSV: images resize could not decode, new images that would join "
                       "units of different splits (output)")],
    ),
    "validate": (
        "tasks.validate",
        "Great Expectations suite on the split manifest and resized images; fails on any violation",
        [("--split", "split manifest CSV (input)"), ("--images", "the image store folder (input)"),
         ("--split-rejects", "the split's quarantine CSV (input): its rows are in the image store, not in a split"),
         ("--result", "validation result JSON (output)"), ("--summary", "readable summary Markdown (output)")],
    ),
    "train": (
        "tasks.train",
        "train a Keras 3 classifier on the train split, selecting on val (resumes a killed run)",
        [("--images", "the image store folder (input)"), ("--split", "split manifest CSV (input)"),
         ("--model-dir", "model folder: model.keras, metadata.json, history.csv, checkpoints/ (output)"),
         ("--live-dir", "DVCLive folder: per-epoch metrics and plots (output)")],
    ),
    "crossval": (
        "tasks.crossval",
        "grouped k-fold cross-validation of the training recipe (crossval.folds; 0 = off): every image scored "
        "once by a model that never saw its patient",
        [("--images", "the image store folder (input)"), ("--split", "split manifest CSV (input)"),
         ("--out", "report folder: metrics.json, predictions.csv, crossval.md (output)"),
         ("--cache", "finished folds' scores and a killed fold's checkpoints (persistent folder)")],
    ),
}


# Flags with a default in the step's run(): resize's rejects go beside its --out; split without the resize
# rejects quarantines none; the manifest without a cache reads every file (dvc.yaml passes all three).
OPTIONAL_FLAGS = frozenset({("resize", "--rejects"), ("split", "--resize-rejects"), ("manifest", "--cache")})


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medflow", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, (_, help_text, flags) in STEPS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_config_args(p, "the dataset of the catalog (datasets/NAME.yaml); needed unless --params holds its "
                            "own dataset: block")
        for flag, flag_help in flags:
            p.add_argument(flag, type=Path, required=(name, flag) not in OPTIONAL_FLAGS, help=flag_help)
    _add_model_commands(sub)
    _add_registry(sub)
    _add_orchestration(sub)
    p = sub.add_parser("preflight", help=PREFLIGHT_HELP, description=PREFLIGHT_HELP)
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS, help="params file (default: params.yaml)")
    return parser


PREFLIGHT_HELP = ("check params.yaml's datasets: list and the datasets/ catalog before DVC sees them: every name a "
                  "dataset name, every dataset's resolved config valid (the download stage runs this first, so a "
                  "bad value stops dvc repro before DVC deletes the outputs of the stage that reads it; see "
                  "SECURITY.md)")


def _preflight(params: Path) -> list[str]:
    """The checked dataset names of ``params`` (:func:`medflow.catalog.preflight`), logged."""
    from medflow.catalog import preflight

    names = preflight(params)
    log.debug("preflight: %s: datasets %s", params, ", ".join(names))
    return names


# --- using a trained model: the evaluate stage / an external folder, and predict ---------------------------
EVALUATE_HELP = ("report on a trained model: with --split, the evaluate stage (threshold on val, test metrics "
                 "with CIs, HTML report, model card); with --images DIR alone, an external labelled folder "
                 "(class subfolders) at the model's stored threshold")


def _add_config_args(p: argparse.ArgumentParser, dataset_help: str) -> None:
    p.add_argument("--dataset", metavar="NAME", help=dataset_help)
    p.add_argument("--params", type=Path, default=DEFAULT_PARAMS,
                   help="params file: shared defaults beside the datasets/ catalog (default: params.yaml)")


MODEL_DATASET_HELP = ("the dataset of the catalog whose model and config to use (models/NAME); default: the "
                      "dataset recorded in --model's metadata.json")


def _add_model_commands(sub: Any) -> None:
    p = sub.add_parser("evaluate", help=EVALUATE_HELP, description=EVALUATE_HELP)
    _add_config_args(p, MODEL_DATASET_HELP)
    p.add_argument("--model", type=Path, help="model folder (default: the champion registered in "
                   "models/<dataset>, else models/<dataset>)")
    p.add_argument("--images", type=Path, required=True,
                   help="the image store of the pipeline (with --split), or a folder with class subfolders")
    p.add_argument("--split", type=Path, help="split manifest CSV (the evaluate stage)")
    p.add_argument("--rejects", type=Path, help="filter rejects CSV, listed in the report")
    p.add_argument("--split-rejects", type=Path, help="the split's quarantine CSV, listed in the report")
    p.add_argument("--validation", type=Path, help="Great Expectations result JSON, summarised in the report")
    p.add_argument("--sources", type=Path, help="resolved sources JSON (provenance in the model card)")
    p.add_argument("--out", type=Path, help="report folder (default: reports/<dataset>/evaluation, or "
                   "reports/<dataset>/external/<folder name> for a folder)")
    p = sub.add_parser("predict", help="score image files, folders, globs or archives with a trained model",
                       description="score image files, folders (recursively), globs or archives (.zip, .tar, "
                       ".tar.gz, .tgz) with a trained model; writes path, probability and label at the model's "
                       "threshold; an unreadable file gets a row with its error")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image file, folder, glob pattern or archive")
    _add_config_args(p, "the dataset of the catalog whose model to use (models/NAME: its champion, else the "
                        "model the train stage wrote); needed unless --model is given")
    p.add_argument("--model", type=Path, help="model folder (default: the champion registered in "
                   "models/<dataset>, else models/<dataset>)")
    p.add_argument("--out", type=Path, help="predictions CSV (default: standard output)")
    p.add_argument("--threshold", type=float, help="override the model's stored operating threshold")
    p.add_argument("--batch-size", type=int, default=64, help="images per model call (default: 64)")
    p.add_argument("--workers", type=int, default=0, help="decoding threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _default_model(dataset: str, stage: bool = False) -> Path:
    """models/<dataset>, or the champion the retrain flow promoted there (never for the evaluate stage,
    which reports on the model the train stage just wrote)."""
    from medflow.lifecycle.registry import champion_dir

    root = Path("models") / dataset
    chosen = None if stage else champion_dir(root)
    if chosen is not None:
        log.info("using the champion model %s", chosen)
    return chosen or root


def _check_registered(model: Path) -> None:
    """A registry version folder (with version.json): its model.keras must be the registered file."""
    from medflow.lifecycle.registry import check_model

    check_model(model)


def _recorded_dataset(model: Path | None) -> str | None:
    """The dataset a model was trained on, as its metadata.json records it (``task``), or None."""
    meta = None if model is None else Path(model) / "metadata.json"
    if meta is None or not meta.is_file():
        return None
    from medflow.io import read_json

    task = read_json(meta).get("task")
    return str(task) if task else None


def _self_contained(params: Path) -> bool:
    """Whether the params file holds its own ``dataset:`` block (the step tests' and benchmarks' form)."""
    try:
        data = load_yaml(Path(params).read_text())
    except (OSError, yaml.YAMLError):
        return False  # load_config reports the problem, naming the file
    return isinstance(data, dict) and "dataset" in data


def _model_config(args: argparse.Namespace) -> Config:
    """The config for a model command: ``--dataset``, else the params file's own block, else the dataset
    recorded with ``--model``; with none of them, load_config's error lists the catalog."""
    dataset = args.dataset
    if dataset is None and not _self_contained(args.params):
        dataset = _recorded_dataset(args.model)
    return load_config(args.params, dataset)


def _evaluate(args: argparse.Namespace) -> None:
    if args.split is None and (args.images / STORE_INDEX).is_file():  # arguments first, before any config
        raise StepError(f"--images {args.images}: an image store needs --split (the evaluate stage)")
    if args.split is not None:  # the evaluate stage: a step, loaded from the project root
        def stage(cfg: Config) -> None:
            model = args.model or _default_model(cfg.dataset.name, stage=True)
            _check_registered(model)
            load_project_module("tasks.evaluate").run(
                cfg, model=model, images=args.images,
                split=args.split, rejects=args.rejects, split_rejects=args.split_rejects, validation=args.validation,
                sources=args.sources,
                out=args.out or Path("reports") / cfg.dataset.name / "evaluation")

        run_as_stage("evaluate", args.dataset, lambda: _model_config(args), stage)
    else:
        from medflow.evaluation import assess

        cfg = _model_config(args)
        model = args.model or _default_model(cfg.dataset.name)
        _check_registered(model)
        out = args.out or Path("reports") / cfg.dataset.name / "external" / args.images.resolve().name
        assess.evaluate_folder(cfg, images=args.images, model=model, out=out)


def _predict(args: argparse.Namespace) -> None:
    """Score files with ``--model``, or with the model of ``--dataset`` (a name of the catalog, checked)."""
    model = args.model
    configured = args.dataset is not None or _self_contained(args.params)
    cfg = load_config(args.params, args.dataset) if configured else None
    if model is None:
        if cfg is None:
            raise ConfigError("predict: name the model: --dataset NAME (its models/NAME) or --model DIR; "
                              + _catalog_hint(args.params))
        model = _default_model(cfg.dataset.name)
    _check_registered(model)
    from medflow import inference as predict
    from medflow.imaging.limits import InputLimits

    limits = InputLimits.of(cfg.extract, cfg.filter) if cfg else InputLimits()  # input caps: config, else defaults
    predict.run(args.paths, model=model, out=args.out, threshold=args.threshold, batch_size=args.batch_size,
                workers=args.workers, progress=not args.no_progress, limits=limits)


def _catalog_hint(params: Path) -> str:
    """``the catalog: a, b`` for an error message (what ``--dataset`` may name beside ``params``)."""
    from medflow.catalog import catalog_dir, catalog_names

    names = catalog_names(catalog_dir(Path(params)))
    return f"the catalog ({catalog_dir(Path(params))}/): {', '.join(names) or 'empty'}"


# --- the model registry: check every version, point the champion at one ----------------------------------
REGISTRY_HELP = ("the model registry of a dataset (models/NAME/versions): `verify` checks every version's "
                 "model.keras against its recorded sha256; `promote VERSION` makes an intact version champion")


def _add_registry(sub: Any) -> None:
    p = sub.add_parser("registry", help=REGISTRY_HELP, description=REGISTRY_HELP)
    p.add_argument("action", choices=("verify", "promote"), help="verify: check every version; promote: "
                   "point champion.json at VERSION")
    p.add_argument("version", nargs="?", help="the version id to promote (see `medflow registry verify`)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--dataset", metavar="NAME", help="the dataset whose registry it is (models/NAME)")
    where.add_argument("--model-root", type=Path, help="the registry's folder (the train stage's --model-dir)")


def _registry(args: argparse.Namespace) -> None:
    """``verify``: one line per version (``ok``/``DAMAGED``, ``*`` the champion); StepError when any is
    damaged. ``promote VERSION``: the champion pointer replaced (the version must be intact)."""
    from medflow.catalog import check_name
    from medflow.lifecycle import registry

    root = args.model_root or Path("models") / check_name(args.dataset)
    if args.action == "promote":
        if not args.version:
            raise StepError("registry promote: name the VERSION to promote (see `medflow registry verify`)")
        registry.promote(root, args.version, {"reason": "promoted by hand (medflow registry promote)"})
        print(f"champion of {root}: {args.version}")
        return
    record = registry.champion(root, verify=False)
    champ = None if record is None else record.get("version")
    results = registry.verify(root)
    if not results:
        raise StepError(f"{registry.versions_dir(root)}: no registered versions")
    for version, problem in results:
        mark = "*" if version == champ else " "
        print(f"{mark} {version}  {'ok' if problem is None else 'DAMAGED: ' + problem}")
    damaged = [v for v, problem in results if problem is not None]
    if damaged:
        raise StepError(f"{len(damaged)} of {len(results)} version(s) damaged"
                        + (", the champion among them" if champ in damaged else "") + f"; {registry.recovery(root)}")


# --- orchestration commands (Prefect is imported only when one of them runs; steps never import it) ----
AUTH_FILE_ENV = "MEDFLOW_AUTH_STRING_FILE"  # the default of --auth-string-file, for server, serve and watch alike
CORS_ENV = ("PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS", "PREFECT_SERVER_CORS_ALLOWED_ORIGINS")  # Prefect's aliases
AUTH_HELP = ("file holding the Prefect API's basic-auth string, one line 'user:password' (the secret never goes "
             f"on a command line); default: ${AUTH_FILE_ENV}, else Prefect's ")


def _add_orchestration(sub: Any) -> None:
    p = sub.add_parser("server", help="start a local Prefect server (SQLite in $PREFECT_HOME, default .prefect/, or "
                                      "PostgreSQL: --database-url)")
    p.add_argument("--host", default="127.0.0.1",
                   help="bind address (default: 127.0.0.1); any other needs an auth string (see SECURITY.md)")
    p.add_argument("--port", type=int, default=4200, help="port (default: 4200)")
    p.add_argument("--auth-string-file", type=Path, metavar="FILE",
                   help=AUTH_HELP + "server.api.auth_string or api.auth_string setting")
    p.add_argument("--database-url", metavar="URL",
                   help="the server's database instead of SQLite: postgresql://USER@HOST:PORT/DB (no password in it; "
                        "default: Prefect's server.database settings, PREFECT_SERVER_DATABASE_CONNECTION_URL)")
    p.add_argument("--database-password-file", type=Path, metavar="FILE",
                   help="file holding the database user's password (one line); default: Prefect's "
                        "PREFECT_SERVER_DATABASE_PASSWORD, else PostgreSQL's ~/.pgpass")
    p = sub.add_parser("deploy", help="register the train-<ds> and retrain-<ds> deployments of this checkout in a "
                                      "process work pool, for `prefect worker start --pool POOL` to run")
    p.add_argument("--pool", required=True, metavar="POOL",
                   help="the work pool (created as a process pool when it does not exist)")
    p.add_argument("--project", type=Path, default=Path("."), help="project folder (default: .)")
    p.add_argument("--auth-string-file", type=Path, metavar="FILE",
                   help=AUTH_HELP + "api.auth_string setting (PREFECT_API_AUTH_STRING)")
    p = sub.add_parser("serve", help="serve the train-<ds> and retrain-<ds> deployments of this checkout")
    p.add_argument("--project", type=Path, default=Path("."), help="project folder (default: .)")
    p.add_argument("--auth-string-file", type=Path, metavar="FILE",
                   help=AUTH_HELP + "api.auth_string setting (PREFECT_API_AUTH_STRING)")
    p = sub.add_parser("watch", help="poll a dataset's inbox; emit a medflow.data.landed event on new data")
    p.add_argument("--dataset", metavar="NAME", help="the dataset of the catalog to watch (required)")
    p.add_argument("--project", type=Path, default=Path("."), help="project folder (default: .)")
    p.add_argument("--interval", type=float, default=None, help="seconds between polls (default: retrain.poll_s)")
    p.add_argument("--once", action="store_true", help="check once and exit (exit code 0 either way)")
    p.add_argument("--auth-string-file", type=Path, metavar="FILE",
                   help=AUTH_HELP + "api.auth_string setting (PREFECT_API_AUTH_STRING)")


def _read_secret_file(path: Path, what: str) -> str:
    """The one non-empty line of the secret file ``path`` (surrounding white space dropped), ``what`` naming it
    in errors; a warning when other users can read it."""
    try:
        text = path.read_text(encoding="utf-8").strip()
        mode = path.stat().st_mode
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read the {what} file ({e})") from None
    if not text or "\n" in text:
        raise ConfigError(f"{path}: the {what} file must hold one non-empty line")
    if mode & 0o077:
        log.warning("%s: the %s file is readable by other users (chmod 600 it)", path, what)
    return text


def read_auth_string(path: Path) -> str:
    """The basic-auth string ``user:password`` in ``path`` (one line; surrounding white space dropped)."""
    text = _read_secret_file(path, "auth string")
    user, sep, password = text.partition(":")
    if not (sep and user and password):
        raise ConfigError(f"{path}: not an auth string: one line 'user:password' expected, neither part empty")
    return text


def _auth_file(args: argparse.Namespace) -> Path | None:
    import os

    value = args.auth_string_file or os.environ.get(AUTH_FILE_ENV)
    return Path(value) if value else None


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or name) is this machine only: localhost, 127.0.0.0/8, ::1."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def ui_origins(ui_api_url: str) -> list[str]:
    """The origins the UI is served from (the UI's API URL's scheme, host and port; both loopback names)."""
    from urllib.parse import urlsplit

    url = urlsplit(ui_api_url)
    origins = [f"{url.scheme}://{url.netloc}"]
    aliases = {"127.0.0.1": "localhost", "localhost": "127.0.0.1"}
    if url.hostname in aliases:
        origins.append(f"{url.scheme}://{aliases[url.hostname]}{f':{url.port}' if url.port else ''}")
    return origins


def _configured_auth_string() -> str | None:
    """The auth string Prefect's own settings give (environment, profile, prefect.toml): the server's, else
    the clients' (the server's own services call the API as clients too)."""
    from prefect.settings import Settings

    settings = Settings()
    for secret in (settings.server.api.auth_string, settings.api.auth_string):
        if secret is not None and secret.get_secret_value():
            return secret.get_secret_value()
    return None


def prepare_server(host: str, port: int, auth_file: Path | None) -> None:
    """Set the environment ``prefect server start`` runs with: home, the UI's API URL, CORS limited to the UI's
    own origin, and the basic-auth string (server and clients) from ``auth_file`` or Prefect's settings.

    A ``host`` other than loopback warns, and is refused (StepError) unless an auth string is set. The secret
    goes through the environment only (readable by this user alone), never the command line.
    """
    import os

    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    # The UI calls the API at this URL (/ui-settings); Prefect's default is port 4200 whatever --port says.
    ui_host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    ui_host = f"[{ui_host}]" if ":" in ui_host else ui_host
    os.environ.setdefault("PREFECT_SERVER_UI_API_URL", f"http://{ui_host}:{port}/api")
    if not any(name in os.environ for name in CORS_ENV):  # Prefect's default is "*": any web page may call it
        os.environ[CORS_ENV[0]] = ",".join(ui_origins(os.environ["PREFECT_SERVER_UI_API_URL"]))
    secret = read_auth_string(auth_file) if auth_file else _configured_auth_string()
    if secret:
        os.environ["PREFECT_SERVER_API_AUTH_STRING"] = os.environ["PREFECT_API_AUTH_STRING"] = secret
    if is_loopback(host):
        return
    if not secret:
        raise StepError(f"--host {host} is not loopback: anyone who reaches it could start runs as you; set an "
                        f"auth string first (--auth-string-file FILE, ${AUTH_FILE_ENV}, or Prefect's "
                        "server.api.auth_string), see SECURITY.md")
    log.warning("binding %s: the Prefect API is reachable from the network, behind basic auth; over plain http "
                "the auth string travels in clear, so put TLS (a reverse proxy) in front or use an SSH tunnel",
                host)


DATABASE_URL_ENV = "PREFECT_SERVER_DATABASE_CONNECTION_URL"
DRIVERS = {"postgresql": "postgresql+asyncpg", "postgresql+asyncpg": "postgresql+asyncpg",
           "sqlite": "sqlite+aiosqlite", "sqlite+aiosqlite": "sqlite+aiosqlite"}  # Prefect's async drivers


def prepare_database(url: str | None, password_file: Path | None) -> None:
    """Point the server at ``url`` (PostgreSQL through asyncpg; ``postgresql://`` is taken as such), the password
    read from ``password_file``; both go to Prefect's server.database settings through the environment only.

    A URL holding a password is refused (it would be on the command line, in ``ps``). With neither argument,
    Prefect's own settings apply (SQLite in $PREFECT_HOME by default).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    if url is None:
        if password_file is not None:
            os.environ["PREFECT_SERVER_DATABASE_PASSWORD"] = _read_secret_file(password_file, "database password")
        return
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"--database-url {url!r}: not a database URL (postgresql://USER@HOST:PORT/DB)") from None
    if parsed.drivername not in DRIVERS:
        raise ConfigError(f"--database-url: {parsed.drivername!r} is not a database Prefect supports: "
                          "postgresql://USER@HOST:PORT/DB, or sqlite:///PATH")
    if parsed.password is not None:
        raise ConfigError("--database-url: the URL holds a password, which would show on the command line: put it in "
                          "a file (--database-password-file FILE) or PREFECT_SERVER_DATABASE_PASSWORD, or ~/.pgpass")
    parsed = parsed.set(drivername=DRIVERS[parsed.drivername])
    if password_file is not None:
        parsed = parsed.set(password=_read_secret_file(password_file, "database password"))
    os.environ[DATABASE_URL_ENV] = parsed.render_as_string(hide_password=False)


NOISY_LOGS_ENV = "MEDFLOW_NOISY_LOGS"  # keeps the log lines quiet by default (README, "Logs")
HTTP_LOGGERS = ("httpx", "httpcore")  # one INFO line per API request: most of a runner's output


def noisy_logs() -> bool:
    """``$MEDFLOW_NOISY_LOGS`` set (1, true, yes, on): keep the lines left out by default (HTTP requests of
    server, runner and watcher; DVC's "is empty" warnings and TensorFlow's C++ INFO banners in task logs)."""
    return os.environ.get(NOISY_LOGS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def quiet_http(verbose: bool) -> None:
    """Server, runner and watcher: no line per HTTP request (httpx's INFO), unless ``-v`` or
    ``$MEDFLOW_NOISY_LOGS``; Prefect's own server log level is its ``PREFECT_SERVER_LOGGING_LEVEL``."""
    if verbose or noisy_logs():
        return
    for name in HTTP_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _orchestrate(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    auth_file = _auth_file(args)
    if args.step == "server":
        prepare_server(args.host, args.port, auth_file)
        prepare_database(args.database_url, args.database_password_file)
        exe = Path(sys.executable).parent / "prefect"
        os.execv(str(exe), [str(exe), "server", "start", "--host", args.host, "--port", str(args.port)])
    os.environ.setdefault("PREFECT_API_URL", "http://127.0.0.1:4200/api")
    if auth_file:  # the runner, its flow runs and the watcher's events send it (PREFECT_API_AUTH_STRING)
        os.environ["PREFECT_API_AUTH_STRING"] = read_auth_string(auth_file)
    _preflight(args.project / DEFAULT_PARAMS)  # names checked before any DVC call resolves dvc.yaml with them
    if args.step == "serve":
        load_project_module("flows.deploy", args.project).serve(args.project)
        return 0
    if args.step == "deploy":
        load_project_module("flows.deploy", args.project).deploy(args.project, args.pool)
        return 0
    emit_data_landed = load_project_module("flows.events", args.project).emit_data_landed
    stages = load_project_module("flows.stages", args.project)
    from medflow.lifecycle.watch import watch

    project = args.project.resolve()
    cfg = load_config(project / DEFAULT_PARAMS, args.dataset)
    try:
        flags = stages.step_flags(stages.pipeline(project, cfg.dataset.name))
    except stages.StageFailed as e:
        raise StepError(str(e)) from None
    n = watch(cfg, flags["download"]["--inbox"], flags["train"]["--model-dir"],
              lambda payload: emit_data_landed(cfg.dataset.name, project, payload),
              interval_s=args.interval or cfg.retrain.poll_s, once=args.once)
    log.info("watch: %d data-landed event(s) emitted", n)
    return 0


MODEL_COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {"evaluate": _evaluate, "predict": _predict,
                                                                   "registry": _registry}


def stage_root() -> Path:
    """The project a stage command writes in, whose dataset lock it takes: the working directory's (DVC runs every
    stage at its project's root), else ``$MEDFLOW_PROJECT``'s. Not ``$MEDFLOW_PROJECT`` first: it names where the
    step's code is (tasks/), and one code checkout may serve stages of another project."""
    try:
        return find_project(Path.cwd())
    except StepError:
        return find_project()


def find_project(start: Path | None = None) -> Path:
    """The nearest folder at or above ``start`` (default: ``$MEDFLOW_PROJECT``, else the working directory)
    with dvc.yaml and tasks/."""
    import os

    here = (start or Path(os.environ.get("MEDFLOW_PROJECT") or Path.cwd())).resolve()
    for folder in (here, *here.parents):
        if (folder / "dvc.yaml").is_file() and (folder / "tasks").is_dir():
            return folder
    raise StepError(f"not inside a medflow project: no folder at or above {here} holds dvc.yaml and tasks/ "
                    "(run step and orchestration commands from a medflow checkout)")


def load_project_module(name: str, start: Path | None = None) -> Any:
    """Import ``tasks.<step>`` or ``flows.<module>`` from the project root (put first on ``sys.path``)."""
    root = str(find_project(start))
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)
    return importlib.import_module(name)


def _entry(step: str) -> Callable[..., Any]:
    module = load_project_module(STEPS[step][0])
    return module.run  # type: ignore[no-any-return]


DAEMONS = ("server", "serve", "watch")  # long-lived services: they outlive the shell that started them
ORCHESTRATION = (*DAEMONS, "deploy")  # the commands that talk to a Prefect server


def _die_with_parent(step: str) -> None:
    """Step and model commands end when the process that started them dies (:mod:`medflow.lifeline`)."""
    from medflow import lifeline

    if step not in DAEMONS and lifeline.enabled():
        lifeline.exit_on_sigterm()
        lifeline.die_with_parent(parent=_STARTED_BY)


# --- a step as a DVC stage: under the dataset's lock, and true to the params DVC will record ------------
def run_as_stage(step: str, dataset: str | None, load: Callable[[], Config], call: Callable[[Config], Any]) -> None:
    """Run ``call(load())`` as the stage ``step``: under the lock of ``dataset`` (a catalog name; none for a
    self-contained params file), failing if the params the stage lists changed before it finished.

    DVC records the params in dvc.lock after the command exits 0, from the files as they are then; a step
    reads them once, at its start. An edit made while it ran would be recorded beside outputs made with the
    old values, so the step fails instead (dvc.lock untouched; ``dvc repro`` re-runs it with the new ones).
    """
    from medflow.lifecycle.retrain import Busy, stage_lock

    lock = contextlib.nullcontext() if dataset is None else stage_lock(stage_root(), dataset)
    try:
        with lock:
            cfg = load()
            call(cfg)
            try:
                now = load()
            except ConfigError as e:
                raise StepError(f"the params changed while the step ran and no longer load ({e}): re-run "
                                "the step once they are fixed") from None
    except Busy as e:
        raise StepError(f"dataset {dataset} is busy: {e}; this stage did not run (dvc.lock is unchanged): re-run "
                        "it (dvc repro) when that run has finished") from None
    changed = changed_params(cfg, now, stage_params(step))
    if changed:
        edits = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise StepError(f"the params changed while the step ran: {edits}; its outputs were made with the old "
                        "values, so DVC must not record the new ones: re-run the step (dvc repro re-runs it)")


def stage_params(step: str) -> list[str] | None:
    """The params keys and sections the ``step`` stage of the project's dvc.yaml lists (from params.yaml and
    from the dataset's catalog file alike: they merge into the one config), or None (compare everything)
    where the project has no such stage."""
    try:
        spec = load_yaml((find_project() / "dvc.yaml").read_text()) or {}
        stage = spec["stages"][step]
        entries = (stage.get("do") or stage)["params"]
    except (OSError, StepError, yaml.YAMLError, KeyError, TypeError):
        return None
    keys: list[str] = []
    for entry in entries:
        keys += [str(k) for v in entry.values() for k in (v or [])] if isinstance(entry, dict) else [str(entry)]
    return keys


def main(argv: Sequence[str] | None = None) -> int:
    """The ``medflow`` command; ``argv`` given (a caller in Python): no signal handling is installed."""
    args = _build_parser().parse_args(argv)
    if argv is None:
        _die_with_parent(args.step)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.step == "preflight":
        try:
            _preflight(args.params)
        except ConfigError as e:
            print(f"medflow preflight: error: {e}", file=sys.stderr)
            return 2
        return 0
    if args.step in ORCHESTRATION:
        quiet_http(args.verbose)
        try:
            return _orchestrate(args)
        except (ConfigError, StepError) as e:
            print(f"medflow {args.step}: error: {e}", file=sys.stderr)
            return 2
    if args.step in MODEL_COMMANDS:
        try:
            MODEL_COMMANDS[args.step](args)
        except (ConfigError, StepError) as e:
            print(f"medflow {args.step}: error: {e}", file=sys.stderr)
            return 2
        return 0
    code = _run_step(args)
    if argv is None:
        exit_without_teardown(code)
    return code


def _run_step(args: argparse.Namespace) -> int:
    """A pipeline step as its DVC stage; the exit status (2: an error named on stderr)."""
    paths = {k: v for k, v in vars(args).items() if k not in {"step", "params", "verbose", "dataset"}}
    for tmp in remove_stale_temps(v for v in paths.values() if isinstance(v, Path)):
        log.info("removed %s, left by a killed run", tmp)
    try:
        run_as_stage(args.step, args.dataset, lambda: load_config(args.params, args.dataset),
                     lambda cfg: _entry(args.step)(cfg, **paths))
    except (ConfigError, StepError) as e:
        print(f"medflow {args.step}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        print(f"medflow {args.step}: error: {e.filename or 'a write of this step'}: {os.strerror(e.errno)} (free space "
              "and run it again)", file=sys.stderr)
        return 2
    return 0


def exit_without_teardown(code: int) -> None:
    """End a finished step command now: exit handlers run and streams are flushed, but not the interpreter's
    teardown of every module (a second and more after Great Expectations' 2,900 modules: 1.2-1.5 s of the
    validate stage's 9 s, 0.1-0.25 s of each other stage, on every ``dvc repro``).

    Every output was written and closed by then (atomic writes; worker pools shut down in ``with`` blocks). A
    thread other than daemons still running (a pool a library left open) gets the normal exit, which joins it,
    and so does a run under a profiler or tracer (``python -m cProfile`` writes its file after this returns).
    """
    if sys.getprofile() is not None or sys.gettrace() is not None:
        return
    if any(not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()  # what the normal exit runs first: logging.shutdown, multiprocessing's, finalizers
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream
            stream.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
