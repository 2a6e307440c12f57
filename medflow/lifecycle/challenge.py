"""Champion/challenger: register the trained model, score it and the champion on one test split, decide, promote.

The procedure the train and retrain flows run after the train stage (``flows/common.py::challenge`` is
its Prefect task). It works on the model folder of one dataset (the train stage's ``--model-dir``,
see :mod:`medflow.lifecycle.registry` for its layout):

1. The trained ``model.keras`` is looked up by digest. Already the champion: nothing to decide. Already
   registered and decided on (``versions/<id>/decision.json``): that decision is returned, not re-made.
2. Otherwise it is registered as a version, and it and the champion are scored on the *same* test split
   (same images, same rows), each at its own operating threshold.
3. :func:`medflow.lifecycle.retrain.decide` never promotes it when it does not beat chance on val (its val
   split is scored and checked as the evaluate stage does, :mod:`medflow.evaluation.chance`); else it
   promotes it when there is no champion, or when the paired bootstrap shows it is not worse beyond
   ``retrain.tolerance`` in test ROC AUC.
4. On promotion the champion pointer is replaced (atomically); then the decision is written.

A damaged registered copy of the trained model (its sha256 no longer the registered one) is first restored
from the train stage's output. A damaged champion (:func:`medflow.lifecycle.registry.model_problem`) is
not scored: the challenger is judged alone (it must beat chance on val) and may replace it; the decision's
reason says so.

The pointer is written only in step 4, so a failure anywhere before it (a damaged model, images that do
not fit, a split without test rows) leaves the champion as it was. The decision is written after the
pointer: a run that fails in between leaves the version undecided, and the next run scores it again
instead of trusting a decision that was never carried out.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medflow.config import Config
from medflow.errors import StepError
from medflow.io import read_json, sha256_file
from medflow.lifecycle import registry
from medflow.lifecycle.retrain import Decision, decide, read_threshold, write_decision

if TYPE_CHECKING:
    from medflow.evaluation.assess import Scores

_log = logging.getLogger(__name__)

Logger = logging.Logger | logging.LoggerAdapter[logging.Logger]  # Prefect's run logger is an adapter
DECISION_FILE = "decision.json"  # in versions/<id>/: the decision made on that version


def challenge(model_root: Path, images: Path, split: Path, cfg: Config, info: dict[str, Any] | None = None,
              *, log: Logger = _log) -> dict[str, Any]:
    """Decide whether the model trained into ``model_root`` replaces the champion; promote it if so.

    ``images`` and ``split`` are the train stage's image store and the split table (its test rows are scored);
    ``cfg`` gives ``retrain`` (tolerance, bootstrap) and ``evaluate`` (``bootstrap_by``: resample images or
    patients; the chance check's bootstrap); ``info`` is stored with a newly registered version (e.g. the
    flow's name). Returns the decision as a dict (the fields of :class:`medflow.lifecycle.retrain.Decision`,
    or a short record when there was nothing to decide). Raises StepError naming the file when a model or
    input is unusable.
    """
    model_root = Path(model_root)
    digest = _trained_digest(model_root)
    if registry.restore(model_root, model_root) is not None:  # a damaged copy of the trained model: rewritten
        log.warning("restored the registered copy of %s from the train stage's output", model_root / "model.keras")
    previous = _previous_decision(model_root, digest, log)
    if previous is not None:
        return previous
    version = registry.register(model_root, model_root, info)
    champion = registry.champion(model_root, verify=False)
    champion_version = None if champion is None else str(champion["version"])
    damaged = None if champion_version is None else registry.model_problem(
        registry.version_dir(model_root, champion_version))
    if damaged:
        log.warning("the champion %s is damaged (%s): the challenger is judged without it", champion_version,
                    damaged)
    new, chance = _score_challenger(model_root, version, images, split, cfg)
    old = None if champion_version is None or damaged else _score(model_root, champion_version, images, split)
    decision = decide(new.y, new.p, None if old is None else old.p, cfg.retrain, challenger=version,
                      champion=None if damaged else champion_version,
                      thresholds=_thresholds(model_root, version, None if damaged else champion_version),
                      groups=new.patient if cfg.evaluate.bootstrap_by == "patient" else None, chance=chance)
    if damaged:
        decision = _over_damaged(decision, str(champion_version), damaged)
    (log.warning if decision.chance.get("at_chance") else log.info)("%s", decision.reason)
    if decision.promote:
        registry.promote(model_root, version, {"reason": decision.reason, "metrics": decision.challenger_metrics})
    write_decision(registry.versions_dir(model_root) / version / DECISION_FILE, decision)
    return decision.as_dict()


def _over_damaged(decision: Decision, champion: str, problem: str) -> Decision:
    """The decision on a challenger judged alone because the champion is damaged, saying so."""
    outcome = ("promoted over the damaged champion" if decision.promote else
               "not promoted (the champion stays damaged: see `medflow registry verify`)")
    reason = decision.reason if not decision.promote else "it beats chance on val; no intact champion to compare"
    return replace(decision, champion=champion, reason=f"{outcome} {champion} ({problem}): {reason}")


def _trained_digest(model_root: Path) -> str:
    """sha256 of the trained ``model.keras`` (the train stage's output); StepError when there is none."""
    model = model_root / "model.keras"
    if not model.is_file():
        raise StepError(f"{model}: no trained model to challenge the champion with (run the train stage first)")
    return sha256_file(model)


def _previous_decision(model_root: Path, digest: str, log: Logger) -> dict[str, Any] | None:
    """The outcome already on record for this model file, or None when it still has to be decided.

    A model that is the champion needs no decision; one registered and decided on keeps its decision (a
    rerun of the flow on unchanged data must not register, score or promote anything again).
    """
    known, champion = registry.find_by_sha(model_root, digest), registry.champion(model_root, verify=False)
    if known is None:
        return None
    if champion is not None and known == champion["version"]:
        log.info("the trained model is the champion (%s): nothing to decide", known)
        return {"promote": False, "reason": f"unchanged: the trained model is already champion {known}",
                "challenger": known, "champion": known}
    path = registry.versions_dir(model_root) / known / DECISION_FILE
    if not path.exists():
        return None  # registered by a run that failed before deciding: decide now
    decided = dict(read_json(path))
    if not decided.get("promote") and champion is not None and registry.model_problem(
            registry.version_dir(model_root, champion["version"])):
        log.warning("the champion %s is damaged: deciding on %s again", champion["version"], known)
        return None
    log.info("model already registered as %s and decided on", known)
    return decided


def _score_challenger(model_root: Path, version: str, images: Path, split: Path,
                      cfg: Config) -> tuple[Scores, dict[str, Any]]:
    """Test-split scores of the challenger and its chance verdict on val (the evaluate stage's own check)."""
    from medflow.evaluation.assess import check_chance, load_trained, score_split

    folder = registry.versions_dir(model_root) / version
    registry.check_model(folder)
    trained = load_trained(folder)
    val = score_split(folder, images, split, "val", trained=trained)
    return score_split(folder, images, split, "test", trained=trained), check_chance(trained, val, split,
                                                                                      cfg.evaluate).as_dict()


def _score(model_root: Path, version: str, images: Path, split: Path) -> Scores:
    """Test-split scores of one registered version."""
    from medflow.evaluation.assess import score_split  # TensorFlow/Keras: imported when a model is scored

    registry.check_model(registry.versions_dir(model_root) / version)
    return score_split(registry.versions_dir(model_root) / version, images, split, "test")


def _thresholds(model_root: Path, challenger: str, champion: str | None) -> tuple[float, float]:
    """Each model's own operating threshold (0.5 where it has no threshold.json, and for no champion)."""
    versions = registry.versions_dir(model_root)
    return read_threshold(versions / challenger), 0.5 if champion is None else read_threshold(versions / champion)
