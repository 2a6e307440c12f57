"""The champion/challenger procedure (medflow.lifecycle.challenge) on tiny real Keras models, without Prefect.

Each model is a saved ``keras.Model`` (mean pixel -> one sigmoid unit) with weights set by hand, so its
ranking of the images is known without training: ``slope > 0`` scores bright images (the positives) high
(test AUC 1), ``slope < 0`` ranks them backwards (AUC 0). The images are a real image store and split.csv in
the pipeline's schema; scoring goes through the evaluate step's own ``score_split``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import ROOT, write_split_csv

from medflow.config import Config, parse_config
from medflow.errors import StepError
from medflow.imaging.store import save_array
from medflow.io import ImageStore, read_json, sha256_file, write_json
from medflow.lifecycle import registry
from medflow.lifecycle.challenge import challenge
from medflow.lifecycle.retrain import decide

SIZE = 8
N = 60  # images; every third is in the test split (20 test images, 10 per class)


@dataclass(frozen=True)
class Project:
    model_root: Path
    images: Path
    split: Path
    cfg: Config


CFG = {"dataset": {"name": "toy", "labels": {"NEG": 0, "POS": 1}, "channels": 1, "group_rule": "filename"},
       "resize": {"size": SIZE}, "retrain": {"tolerance": 0.05, "bootstrap": 1000}}
HEAVY = ("tensorflow", "keras", "jax", "torch")
# The decision of a no-op run in a fresh interpreter, with the flows' own modules imported: what it loaded.
NO_OP = f"""
import json, sys
from pathlib import Path
import flows.common, flows.retrain, flows.train
from medflow.config import parse_config
from medflow.lifecycle.challenge import challenge
root, images, split = map(Path, sys.argv[1:4])
decision = challenge(root, images, split, parse_config(json.loads(sys.argv[4])))
print(json.dumps({{"reason": decision["reason"], "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
"""


def _cfg() -> Config:
    return parse_config(CFG)


def _train(model_root: Path, slope: float, bias: float | None = None) -> None:
    """Write a trained model folder as the train stage does: model.keras and metadata.json (``slope`` 0: the
    model outputs sigmoid(``bias``) whatever the image)."""
    inputs = keras.Input((SIZE, SIZE, 1))
    outputs = keras.layers.Dense(1, activation="sigmoid")(keras.layers.GlobalAveragePooling2D()(inputs))
    model = keras.Model(inputs, outputs)
    b = -125 * slope if bias is None else bias
    model.layers[-1].set_weights([np.array([[slope]], dtype=np.float32), np.array([b], dtype=np.float32)])
    model_root.mkdir(parents=True, exist_ok=True)
    model.save(model_root / "model.keras")
    write_json(model_root / "metadata.json", {"input_shape": [SIZE, SIZE, 1],
                                              "preprocessing": {"size": SIZE, "channels": 1}})


@pytest.fixture
def project(tmp_path: Path) -> Project:
    """An image store (positives bright, negatives dark, both noisy) and a split.csv with train/val/test rows."""
    rng = np.random.default_rng(0)
    labels = np.arange(N) % 2
    means = np.where(labels == 1, 170, 80)[:, None, None, None]
    images = tmp_path / "images"
    save_array(images, np.clip(rng.normal(means, 20, (N, SIZE, SIZE, 1)), 0, 255).astype(np.uint8))
    splits = np.array(["train", "val", "test"])[np.arange(N) % 3]
    split = write_split_csv(tmp_path / "split.csv", paths=[f"raw/img_{i:03d}.png" for i in range(N)],
                            labels=list(labels), splits=list(splits))
    return Project(tmp_path / "models/toy", images, split, _cfg())


def _challenge(p: Project) -> dict:
    return challenge(p.model_root, p.images, p.split, p.cfg, {"flow": "test"})


def test_first_model_becomes_champion_and_a_rerun_decides_nothing(project: Project) -> None:
    _train(project.model_root, slope=0.05)
    first = _challenge(project)
    assert first["promote"] and "no champion" in first["reason"] and first["n_test"] == N // 3
    assert first["challenger_metrics"]["roc_auc"] == 1.0
    champion = registry.champion(project.model_root)
    assert champion is not None and champion["version"] == first["challenger"]
    version_dir = project.model_root / "versions" / first["challenger"]
    assert read_json(version_dir / "decision.json") == first
    assert read_json(version_dir / "version.json")["flow"] == "test"
    again = _challenge(project)  # same model file: already champion
    assert not again["promote"] and again["reason"].startswith("unchanged") and again["champion"] == first["challenger"]
    assert registry.list_versions(project.model_root) == [first["challenger"]]
    # Issue 13: a run with nothing to decide finds that out before TensorFlow is imported (it cost 7 s).
    run = subprocess.run([sys.executable, "-c", NO_OP, str(project.model_root), str(project.images),
                          str(project.split), json.dumps(CFG)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads(run.stdout.splitlines()[-1]) == {"reason": again["reason"], "heavy": []}


def test_worse_challenger_is_not_promoted_and_better_one_is(project: Project) -> None:
    _train(project.model_root, slope=0.05)
    champion = _challenge(project)["challenger"]
    _train(project.model_root, slope=-0.05)  # ranks every image backwards: worse, and at chance on val
    worse = _challenge(project)
    assert not worse["promote"] and worse["champion"] == champion
    assert worse["reason"].startswith("not promoted: the model does not beat chance on val")
    assert worse["chance"]["at_chance"] and worse["chance"]["val_auc"] == 0.0
    assert worse["challenger_metrics"]["roc_auc"] == 0.0 and worse["champion_metrics"]["roc_auc"] == 1.0
    assert worse["difference"]["high"] < 0
    assert (registry.champion(project.model_root) or {}).get("version") == champion
    assert _challenge(project) == worse  # decided once: a rerun returns the decision on record
    _train(project.model_root, slope=0.1)  # the same ranking as the champion: not worse
    equal = _challenge(project)
    assert equal["promote"] and equal["difference"]["point"] == 0.0
    record = registry.champion(project.model_root)
    assert record is not None and record["version"] == equal["challenger"] and record["previous"] == champion
    assert len(registry.list_versions(project.model_root)) == 3


def test_a_failure_midway_leaves_the_champion_pointer_untouched(project: Project) -> None:
    _train(project.model_root, slope=0.05)
    champion = _challenge(project)["challenger"]
    pointer = project.model_root / "champion.json"
    before = pointer.read_bytes()
    # Images that do not fit the models: the challenger is registered, then scoring fails; nothing is decided.
    _train(project.model_root, slope=0.1)
    good_images = ImageStore(project.images)[:]
    save_array(project.images, np.zeros((N, SIZE * 2, SIZE * 2, 1), dtype=np.uint8))
    with pytest.raises(StepError, match="images are"):
        _challenge(project)
    assert pointer.read_bytes() == before
    challenger = registry.find_by_sha(project.model_root, sha256_file(project.model_root / "model.keras"))
    assert challenger is not None and challenger != champion
    assert not (project.model_root / "versions" / challenger / "decision.json").exists()
    # Once the inputs are whole again, the registered challenger is decided on (not registered twice).
    save_array(project.images, good_images)
    decided = _challenge(project)
    assert decided["promote"] and decided["challenger"] == challenger and decided["champion"] == champion
    assert len(registry.list_versions(project.model_root)) == 2


def _cut(path: Path) -> None:
    """Truncate a file to half its size (a copy cut short, a disk that filled up)."""
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


def test_a_damaged_champion_is_never_loaded_and_says_how_to_recover(project: Project) -> None:
    from medflow.evaluation.assess import load_trained

    _train(project.model_root, slope=0.05)
    champion = _challenge(project)["challenger"]
    folder = project.model_root / "versions" / champion
    _cut(folder / "model.keras")
    for load in (lambda: registry.champion(project.model_root), lambda: registry.champion_dir(project.model_root),
                 lambda: registry.check_model(folder)):
        with pytest.raises(registry.DamagedModel, match=f"{folder / 'model.keras'}: damaged: its sha256 .* is not "
                           "the registered .* cut short.*medflow registry verify --model-root"):
            load()
    with pytest.raises(StepError, match=f"{folder / 'model.keras'}: damaged: not a complete .keras"):
        load_trained(folder)  # any model folder: Keras would say "File not found"
    with pytest.raises(registry.DamagedModel, match="cannot promote"):
        registry.promote(project.model_root, champion)
    # The train stage's model is that version: the next run restores the file and decides nothing new.
    again = _challenge(project)
    assert again["reason"].startswith("unchanged") and registry.model_problem(folder) is None
    assert load_trained(folder).metadata["preprocessing"]["size"] == SIZE


def test_a_valid_challenger_replaces_a_damaged_champion_and_says_so(project: Project) -> None:
    _train(project.model_root, slope=0.05)
    champion = _challenge(project)["challenger"]
    _train(project.model_root, slope=-0.05)  # at chance on val: never promoted, even over a damaged champion
    assert not _challenge(project)["promote"]
    _cut(project.model_root / "versions" / champion / "model.keras")
    useless = _challenge(project)  # decided again now that the champion is damaged, still not promoted
    assert not useless["promote"] and useless["reason"].startswith("not promoted (the champion stays damaged")
    _train(project.model_root, slope=0.1)
    decided = _challenge(project)
    assert decided["promote"] and decided["champion"] == champion
    assert decided["reason"].startswith(f"promoted over the damaged champion {champion}") and "cut short" in \
        decided["reason"]
    record = registry.champion(project.model_root)
    assert record is not None and record["version"] == decided["challenger"] and record["previous"] == champion


def test_no_trained_model_is_an_error_naming_the_file(project: Project) -> None:
    with pytest.raises(StepError, match=f"{project.model_root / 'model.keras'}: no trained model"):
        _challenge(project)


def test_a_model_that_outputs_the_prevalence_is_never_promoted(project: Project) -> None:
    train = pd.read_csv(project.split).query("split == 'train'")["label"]
    prevalence = float(train.mean())
    _train(project.model_root, slope=0.0, bias=float(np.log(prevalence / (1 - prevalence))))
    first = _challenge(project)  # no champion yet, and still not promoted
    assert not first["promote"] and first["champion"] is None
    assert first["reason"].startswith("not promoted: the model does not beat chance on val")
    verdict = first["chance"]
    assert verdict["at_chance"] and verdict["val_auc"] == 0.5 and len(verdict["reasons"]) == 2
    assert verdict["train_prevalence"] == pytest.approx(prevalence)
    assert registry.champion(project.model_root) is None
    _train(project.model_root, slope=0.05)  # a learnt model: beats chance, becomes the first champion
    learnt = _challenge(project)
    assert learnt["promote"] and "no champion" in learnt["reason"] and not learnt["chance"]["at_chance"]
    assert (registry.champion(project.model_root) or {}).get("version") == learnt["challenger"]


def test_a_challenger_worse_beyond_tolerance_keeps_the_champion(project: Project) -> None:
    rng = np.random.default_rng(0)
    y = np.arange(200) % 2
    p_old = np.clip(0.3 + 0.4 * y + rng.normal(0, 0.1, 200), 0, 1)  # near perfect
    p_new = np.clip(0.4 + 0.2 * y + rng.normal(0, 0.2, 200), 0, 1)  # learnt, but worse
    beats = {"at_chance": False, "summary": "the model beats chance on val"}
    d = decide(y, p_new, p_old, project.cfg.retrain, challenger="v2", champion="v1", chance=beats)
    assert not d.promote and d.reason.startswith("kept champion") and d.chance == beats
    same = decide(y, p_old, p_old, project.cfg.retrain, challenger="v2", champion="v1", chance=beats)
    assert same.promote and same.reason.startswith("promoted")
    refused = decide(y, p_old, p_old, project.cfg.retrain, challenger="v2", champion="v1",
                     chance={"at_chance": True, "summary": "the model does not beat chance on val: ..."})
    assert not refused.promote and refused.reason == "not promoted: the model does not beat chance on val: ..."


def test_registry_verify_lists_the_damaged_champion_and_promote_recovers(
        project: Project, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    from medflow.cli import main

    _train(project.model_root, slope=0.05)
    first = _challenge(project)["challenger"]
    _train(project.model_root, slope=0.1)
    second = _challenge(project)["challenger"]
    _cut(project.model_root / "versions" / second / "model.keras")
    root = ["--model-root", str(project.model_root)]
    capsys.readouterr()
    assert main(["registry", "verify", *root]) == 2
    out, err = capsys.readouterr()
    assert f"  {first}  ok" in out and f"* {second}  DAMAGED: " in out
    assert "1 of 2 version(s) damaged, the champion among them" in err and "registry promote" in err
    image = tmp_path / "x.png"
    Image.fromarray(np.full((48, 48), 200, np.uint8)).save(image)  # over filter.min_side: predict scores it
    assert main(["predict", "--model", str(project.model_root / "versions" / second), str(image)]) == 2
    assert "model.keras: damaged: its sha256" in capsys.readouterr().err  # not Keras's "File not found"
    assert main(["registry", "promote", first, *root]) == 0
    record = registry.champion(project.model_root)
    assert record is not None and record["version"] == first and record["previous"] == second
    assert main(["predict", "--model", str(registry.champion_dir(project.model_root)), str(image),
                 "--threshold", "0.5", "--no-progress"]) == 0
