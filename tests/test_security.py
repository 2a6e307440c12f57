"""Issue 18 (SECURITY.md): no shell from a dataset name, a registry pointer that stays inside the registry, a
report that fetches nothing, models loaded in Keras' safe mode, YAML and .npy read without code, and
dependency floors past the known safe_mode bypasses.

The name tests run real DVC on a scratch checkout of this pipeline with hostile names in params.yaml and the
catalog: the download stage's ``medflow preflight`` stops it before a shell sees the name, and the same
checkout without that first command does run the injected command (so the test can fail).
"""

from __future__ import annotations

import ast
import functools
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, copy_project

import medflow.catalog
from flows import stages

# Imported here, not in a test: Prefect's first import under capsys, after an in-process resize run in the same
# worker (test_odd_files), left pytest's own stderr capture closed ("I/O operation on closed file").
from flows.common import open_project
from flows.deploy import catalog
from medflow.catalog import check_name, preflight
from medflow.cli import main
from medflow.config import ConfigError, parse_config
from medflow.errors import StepError
from medflow.lifecycle import registry

HOSTILE = ["x;touch MARK;:", "y$(touch MARK)"]  # each a valid file name, so the catalog can hold it too
CODE_DIRS = ("medflow", "tasks", "flows", "scripts", "benchmarks")


# --- 1. names: checked before any shell sees them ----------------------------------------------------------
@pytest.mark.parametrize("name", [".", "..", "x;id", "x$(id>OUT)", "a/b", "../x", "A", "", " a", "a\n", "-a",
                                  "a b", 1, None])
def test_a_name_outside_the_pattern_is_refused_everywhere(name: Any) -> None:
    with pytest.raises(ConfigError, match="is not a dataset name"):
        check_name(name)
    with pytest.raises(ConfigError, match="dataset.name"):  # a self-contained params file's own block
        parse_config({"dataset": {"name": name, "labels": {"a": 0, "b": 1}}})


def _checkout(dest: Path, names: list[str]) -> Path:
    """A git + DVC checkout of this pipeline whose params.yaml lists ``names`` (pneumonia first), each with
    a catalog file and an inbox folder (so DVC finds every dep and param it checks before running)."""
    copy_project(dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["datasets"] = names
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    entry = yaml.safe_load((dest / "datasets" / "pneumonia.yaml").read_text())
    entry["dataset"]["sources"] = []
    for name in names:
        (dest / "datasets" / f"{name}.yaml").write_text(yaml.safe_dump(entry, sort_keys=False))
        (dest / "data" / "inbox" / name).mkdir(parents=True, exist_ok=True)
    for stale in (dest / "datasets").glob("*.yaml"):
        if stale.stem not in names:
            stale.unlink()
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return dest


def test_preflight_names_the_bad_entry_of_the_list_and_of_the_catalog(tmp_path: Path) -> None:
    project = _checkout(tmp_path / "p", ["pneumonia", *HOSTILE])
    with pytest.raises(ConfigError, match=r"params.yaml: datasets.1: 'x;touch MARK;:' is not a dataset name"):
        preflight(project / "params.yaml")
    (project / "params.yaml").write_text(yaml.safe_dump({"datasets": ["pneumonia"]}))  # unlisted hostile files
    with pytest.raises(ConfigError, match=r"datasets/x;touch MARK;:.yaml: file name: 'x;touch MARK;:' is not"):
        preflight(project / "params.yaml")


def test_hostile_names_reach_dvc_but_no_shell(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Real DVC resolves the hostile stages; `dvc repro` (all, one, --dry) runs none of their commands; the
    CLI, the flows and `medflow serve` refuse before calling DVC, naming the entry."""
    project = _checkout(tmp_path / "p", ["pneumonia", *HOSTILE])
    code, listed = stages.dvc(project, "stage", "list")
    assert code == 0 and "download@x;touch MARK;:" in listed  # DVC itself sees and templates the names
    _, dry = stages.dvc(project, "repro", "--dry")  # prints the commands it would run (up to a missing dep)
    assert "> medflow preflight\n> medflow download --dataset x;touch MARK;: " in dry, dry
    assert not (project / "MARK").exists()
    for target in ([], ["download@x;touch MARK;:"], ["--force", "download"], ["evaluate@y$(touch MARK)"]):
        code, output = stages.dvc(project, "repro", *target)
        assert code != 0 and not (project / "MARK").exists(), output
        assert "medflow preflight: error: " in output and "datasets.1: 'x;touch MARK;:'" in output, output
    assert main(["preflight", "--params", str(project / "params.yaml")]) == 2
    assert "datasets.1: 'x;touch MARK;:' is not a dataset name" in capsys.readouterr().err
    for refuse in (lambda: open_project(str(project), "pneumonia"), lambda: catalog(project)):
        with pytest.raises(ConfigError, match=r"datasets.1: 'x;touch MARK;:'"):
            refuse()
    assert not (project / "MARK").exists()


def test_without_the_preflight_the_same_checkout_runs_the_injected_command(tmp_path: Path) -> None:
    """The control: what the download stage's first command prevents (DVC pastes the name into a shell)."""
    project = _checkout(tmp_path / "p", ["pneumonia", HOSTILE[0]])
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    download = spec["stages"]["download"]["do"]
    assert download["cmd"][0] == "medflow preflight"
    download["cmd"] = download["cmd"][-1]
    (project / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    stages.dvc(project, "repro", "--single-item", f"download@{HOSTILE[0]}")
    assert (project / "MARK").exists()


def test_every_stage_runs_after_the_preflight_of_its_dataset() -> None:
    """Only the download stage runs `medflow preflight`; DVC runs a stage's upstream first, so every other
    stage of a dataset must depend (transitively) on its download stage."""
    found = stages.pipeline(ROOT)
    needs = {s.name: set(s.needs) for s in found}
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert spec["stages"]["download"]["do"]["cmd"][0] == "medflow preflight"
    for stage in found:
        upstream, todo = set(), list(needs[stage.name])
        while todo:
            name = todo.pop()
            if name not in upstream:
                upstream.add(name)
                todo.extend(needs[name])
        assert stage.step == "download" or f"download@{stage.dataset}" in upstream, stage.name


# --- 4. the registry's pointer -----------------------------------------------------------------------------
def _registry(tmp_path: Path) -> tuple[Path, str]:
    root = tmp_path / "models" / "ds"
    root.mkdir(parents=True)
    (root / "model.keras").write_bytes(b"model")
    (root / "metadata.json").write_text("{}")
    version = registry.register(root, root)
    registry.promote(root, version)
    return root, version


@pytest.mark.parametrize("pointer", ["ABS", "../../elsewhere", "../ds/versions/{v}", "{v}/../{v}", "{v}/", "", None,
                                     7, "20260101T120000Z-0123456789/../../../elsewhere"])
def test_champion_json_must_name_a_version_id_inside_versions(tmp_path: Path, pointer: Any) -> None:
    root, version = _registry(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "model.keras").write_bytes(b"not ours")  # what an escaping pointer would serve
    if isinstance(pointer, str):
        pointer = str(elsewhere) if pointer == "ABS" else pointer.format(v=version)
    (root / "champion.json").write_text(json.dumps({"version": pointer}))
    for read in (registry.champion, registry.champion_dir):
        with pytest.raises(StepError, match="champion.json: points at version .* is not a version id"):
            read(root)
    with pytest.raises(StepError):
        registry.promote(root, str(elsewhere))


def test_a_version_folder_linked_out_of_the_registry_is_refused(tmp_path: Path) -> None:
    root, version = _registry(tmp_path)
    outside = tmp_path / "outside"
    shutil.move(root / "versions" / version, outside)
    (root / "versions" / version).symlink_to(outside, target_is_directory=True)
    with pytest.raises(StepError, match="outside"):
        registry.champion_dir(root)
    (root / "versions" / version).unlink()
    shutil.move(outside, root / "versions" / version)
    assert registry.champion_dir(root) == root / "versions" / version  # the genuine pointer still works


# --- 5. the report fetches nothing -------------------------------------------------------------------------
CARD = {"title": "Toy ![beacon](http://example.invalid/t.png)",
        "provenance": 'See <img src="http://example.invalid/p.png"> and <script>alert(1)</script> '
                      "[x]: http://example.invalid/ref.png",
        "intended_use": "![alt](http://example.invalid/u.png) <http://example.invalid/auto.png>",
        "limitations": ["`code` ![l](http://example.invalid/l.png)", '<iframe src="http://example.invalid/f">']}
HOSTILE_SOURCE = "http://example.invalid/a` ![s](http://example.invalid/s.png) `b.zip"  # breaks a 1-tick code span


def _hostile_report(tmp_path: Path) -> dict[str, str]:
    from test_report import _evaluation, _written

    ev = _evaluation(tmp_path, class_names=("NORMAL", '<img src="http://example.invalid/c.png">'))
    ev.data["card"] = CARD
    ev.data["sources"] = [{"url": HOSTILE_SOURCE, "kind": "remote"}, {"path": "/in/x<img src=y>.zip"}]
    ev.source = "external set x ![e](http://example.invalid/e.png)"
    return _written(ev, tmp_path / "out")


def _remote_refs_markdown(text: str) -> list[str]:
    """What a Markdown viewer would fetch or run: images, raw HTML tags (CommonMark, html on)."""
    from markdown_it import MarkdownIt

    html = MarkdownIt("commonmark", {"html": True}).render(text)
    return re.findall(r"<(?:img|script|iframe)\b[^>]*>", html, flags=re.IGNORECASE)


def test_a_report_from_a_hostile_card_has_no_remote_source_and_no_script(tmp_path: Path) -> None:
    from medflow.evaluation import report

    written = _hostile_report(tmp_path)
    page = written[report.REPORT]
    assert "<script" not in page.lower() and "<iframe" not in page.lower()
    sources = re.findall(r'\b(?:src|srcset|poster|data|action)\s*=\s*"([^"]*)"', page, flags=re.IGNORECASE)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    links = re.findall(r'\bhref\s*=\s*"([^"]*)"', page, flags=re.IGNORECASE)
    assert not [u for u in links if "example.invalid" in u]  # user text makes no link either
    assert 'http-equiv="Content-Security-Policy"' in page
    assert "default-src 'none'; img-src data:; style-src 'unsafe-inline'" in page
    for name in (report.MODEL_CARD, report.SUMMARY):  # inert in any Markdown viewer, raw HTML on
        assert _remote_refs_markdown(written[name]) == [], name
    assert "Toy" in written[report.MODEL_CARD] and "alert(1)" in written[report.MODEL_CARD]  # escaped, not lost


def test_markdown_images_are_off_in_the_report() -> None:
    from medflow.evaluation.report import markdown_html

    html = markdown_html("![x](http://example.invalid/x.png) <img src=\"http://example.invalid/y.png\">")
    assert "<img" not in html and "&lt;img" in html


def _page_requests(netlog: Path) -> list[str]:
    """URLs of the network requests a page made (its network isolation key is the file:// page), from
    Chromium's --log-net-log JSON; the browser's own background requests are left out."""
    data = json.loads(netlog.read_text())
    return sorted({str(e["params"]["url"]) for e in data.get("events", [])
                   if "url" in e.get("params", {}) and "file://" in str(e["params"].get("network_isolation_key", ""))
                   and not str(e["params"]["url"]).startswith(("file:", "data:"))})


def _open_in_chromium(page: Path, tmp: Path) -> list[str]:
    netlog = tmp / f"{page.stem}-net.json"
    subprocess.run([shutil.which("chromium") or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-default-apps", f"--user-data-dir={tmp / 'profile'}",
                    f"--log-net-log={netlog}", "--dump-dom", page.resolve().as_uri()],
                   capture_output=True, timeout=120, check=True)
    return _page_requests(netlog)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not installed")
def test_chromium_opens_the_hostile_report_without_a_single_request(tmp_path: Path) -> None:
    from medflow.evaluation import report

    _hostile_report(tmp_path)
    control = tmp_path / "control.html"  # the same kind of beacon, undefended: proves the log sees requests
    control.write_text('<html><body><img src="http://example.invalid/control.png"></body></html>')
    assert "http://example.invalid/control.png" in _open_in_chromium(control, tmp_path)
    assert _open_in_chromium(tmp_path / "out" / report.REPORT, tmp_path) == []


# --- keep: no code from data -------------------------------------------------------------------------------
def test_a_keras_file_with_a_lambda_calling_os_system_is_refused(tmp_path: Path) -> None:
    import keras

    from medflow.evaluation.assess import load_trained

    marker = tmp_path / "RAN"
    folder = tmp_path / "model"
    folder.mkdir()
    command = f"touch {marker}"
    model = keras.Sequential([keras.Input((2,)), keras.layers.Lambda(
        lambda x: x + 0 * __import__("os").system(command))])
    model.save(folder / "model.keras")
    (folder / "metadata.json").write_text(json.dumps({"preprocessing": {"size": 2, "channels": 1}}))
    marker.unlink(missing_ok=True)  # building the model above ran it once
    with pytest.raises(StepError, match="model.keras: cannot load the model"):
        load_trained(folder)
    assert not marker.exists()
    keras.saving.load_model(folder / "model.keras", safe_mode=False)  # the control: unsafe loading runs it
    assert marker.exists()


@functools.cache
def _attribute_calls() -> dict[str, list[tuple[Path, ast.Call]]]:
    """Every ``x.attr(...)`` call in :data:`CODE_DIRS`, by ``attr``: the code is parsed once per session (it was
    parsed again for every attribute a test looks up, 8 parses of the whole project in one test)."""
    found: dict[str, list[tuple[Path, ast.Call]]] = {}
    for folder in CODE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                    found.setdefault(node.func.attr, []).append((path.relative_to(ROOT), node))
    return found


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    return _attribute_calls().get(name, [])


def _keyword(call: ast.Call, name: str) -> Any:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_every_load_model_call_passes_safe_mode_true() -> None:
    calls = _calls("load_model")
    assert len(calls) >= 3  # evaluation, resume, backbone weights from a .keras file
    assert [f"{p}:{c.lineno}" for p, c in calls if _keyword(c, "safe_mode") is not True] == []


def _safe_loader(call: ast.Call) -> bool:
    """``yaml.load(text, Loader=_LOADER)`` where ``_LOADER`` is medflow.catalog's (checked to be a safe one)."""
    loader = _keyword(call, "Loader")
    return isinstance(loader, ast.Name) and loader.id == "_LOADER"


def test_yaml_is_read_with_safe_load_and_npy_without_pickle() -> None:
    assert medflow.catalog._LOADER in (yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    yaml_calls = [(p, c) for attr in ("load", "load_all", "unsafe_load", "full_load", "full_load_all")
                  for p, c in _calls(attr) if isinstance(c.func, ast.Attribute) and
                  isinstance(c.func.value, ast.Name) and c.func.value.id == "yaml"]
    unsafe = [f"{p}:{c.lineno}" for p, c in yaml_calls if not (p.name == "catalog.py" and _safe_loader(c))]
    assert unsafe == []
    np_loads = [(p, c) for p, c in _calls("load") if isinstance(c.func, ast.Attribute)
                and isinstance(c.func.value, ast.Name) and c.func.value.id in ("np", "numpy")]
    assert [f"{p}:{c.lineno}" for p, c in np_loads if _keyword(c, "allow_pickle") is not False] == []
    pickled = [f"{p}:{c.lineno}" for attr in ("loads", "load") for p, c in _calls(attr)
               if isinstance(c.func.value, ast.Name) and c.func.value.id in ("pickle", "cloudpickle", "joblib")]
    assert pickled == []


# --- 8. dependency floors ----------------------------------------------------------------------------------
def _version(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def test_the_keras_floor_is_past_the_known_safe_mode_bypasses_and_the_lock_meets_it() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (keras_dep,) = [d for d in deps if re.match(r"keras\b", d)]
    floor = _version(keras_dep.split(">=", 1)[1])
    assert floor >= (3, 14, 0), keras_dep  # CVE-2025-1550 (3.9), -8747/-9906 (3.11), -9905 (3.11.3), ... (3.14)
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    (locked,) = [p["version"] for p in lock["package"] if p["name"] == "keras"]
    assert _version(locked) >= floor


def test_uv_is_pinned_to_a_range_and_its_wheels_to_sha256s() -> None:
    text = (ROOT / "scripts" / "uv").read_text()
    version = re.search(r'^VERSION = "([\d.]+)"', text, re.M)
    bound = re.search(r'^MINOR_BOUND = "([\d.]+)"', text, re.M)
    assert version and bound and _version(version.group(1)) < _version(bound.group(1))
    pins = re.findall(r'"(uv-[^"]+\.whl)",\s*"([0-9a-f]{64})"', text)
    assert pins and all(f"uv-{version.group(1)}-" in wheel for wheel, _ in pins), pins
    two_commands = (ROOT / "README.md").read_text().split("## Two commands")[1].split("```bash")[1].split("```")[0]
    for commands in ((ROOT / "scripts" / "test").read_text(), two_commands):
        assert "scripts/uv sync --frozen" in commands and "pip install" not in commands
    if shutil.which("uv"):
        here = _version(subprocess.run(["uv", "--version"], capture_output=True, text=True).stdout)
        assert _version(version.group(1)) <= here < _version(bound.group(1)), f"this machine's uv {here}"
