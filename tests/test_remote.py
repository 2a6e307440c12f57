"""DVC remotes (README, "Remote storage"): real images pushed to the shipped default remote (a local directory
beside the checkout) and to an S3 remote served by moto on 127.0.0.1; then the cache, the workspace copy and
the local remote dropped and the images pulled back from S3 byte for byte. One DVC project, seven `dvc` runs."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT, git_commit_all, shared_dataset

pytestmark = pytest.mark.integration
DVC = str(Path(sys.executable).parent / "dvc")
BUCKET = "medflow-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    """moto's S3 server on a free loopback port, with an empty bucket ``BUCKET``; yields its URL."""
    pytest.importorskip("dvc_s3")
    import boto3
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        server.stop()


def _env(tmp_path: Path) -> dict[str, str]:
    """S3 credentials from the environment only (moto takes any), none from this machine's ~/.aws."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_EC2_METADATA_DISABLED": "true"}


def _dvc(project: Path, *args: str) -> str:
    proc = subprocess.run([DVC, *args], cwd=project, env=_env(project.parent), capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, f"dvc {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_push_drop_cache_pull_identical_on_default_and_s3_remotes(tmp_path: Path, s3_endpoint: str) -> None:
    import boto3

    cells = shared_dataset("malaria_cells")
    project = tmp_path / "project"
    for name in (".dvc/config", ".dvc/.gitignore", ".gitignore", ".dvcignore"):  # the shipped DVC settings
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    git_commit_all(project)
    images = project / "cells"  # `dvc add`ed (the pipeline's own outputs are ignored by git, tracked in dvc.lock)
    for cls in ("Parasitized", "Uninfected"):
        (images / cls).mkdir(parents=True)
        for src in sorted((cells / cls).iterdir())[:4]:
            shutil.copy2(src, images / cls / src.name)
    expected = _digests(images)
    assert len(expected) == 8
    _dvc(project, "add", str(images.relative_to(project)))

    # the shipped default remote: a local directory beside the checkout (.dvc/config: ../medflow-dvc-remote)
    _dvc(project, "push")
    store = tmp_path / "medflow-dvc-remote"
    stored = _digests(store)
    assert set(expected.values()) < set(stored.values()) and len(stored) == 9  # 8 images + the folder's listing

    # an S3 remote as the README sets one up (credentials from the environment here)
    _dvc(project, "remote", "add", "s3", f"s3://{BUCKET}/medflow")
    _dvc(project, "remote", "modify", "s3", "endpointurl", s3_endpoint)
    _dvc(project, "push", "-r", "s3")
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing",
                      aws_secret_access_key="testing")
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket=BUCKET, Prefix="medflow/").get("Contents", [])}
    assert keys == {f"medflow/{name}" for name in stored}  # the same content-addressed layout as the local one

    # drop the cache, the workspace copy and the local remote: what comes back can only come from S3
    for folder in (project / ".dvc" / "cache", images, store):
        shutil.rmtree(folder)
    _dvc(project, "pull", "-r", "s3", images.name)
    assert _digests(images) == expected
