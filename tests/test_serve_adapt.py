"""POST /adapt: off by default, token-protected, confined to adapt_data_root, launches `defect adapt`."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from pipeline.serve.http import create_app


def _client(tmp_path: Path, **settings) -> TestClient:
    base = {"adapt_token": None, "adapt_data_root": None, "registry_mode": True, "line": "l1",
            "model": str(tmp_path / "models"), "db": str(tmp_path / "results.sqlite"),
            "max_upload_bytes": 1024, "request_timeout_s": 1.0}
    daemon = SimpleNamespace(settings=SimpleNamespace(**{**base, **settings}))
    return TestClient(create_app(daemon))


def test_adapt_is_off_without_a_token(tmp_path):
    assert _client(tmp_path).post("/adapt", json={"data": "x"}).status_code == 404


def test_adapt_needs_the_right_token(tmp_path):
    c = _client(tmp_path, adapt_token="s3cret", adapt_data_root=str(tmp_path))
    assert c.post("/adapt", json={"data": "x"}).status_code == 401
    assert c.post("/adapt", json={"data": "x"}, headers={"Authorization": "Bearer nope"}).status_code == 401


@pytest.mark.parametrize("data", ["../outside", "/etc", "missing", ""])
def test_adapt_refuses_paths_outside_the_root(tmp_path, data):
    root = tmp_path / "labelled"
    root.mkdir()
    (tmp_path / "outside").mkdir()
    c = _client(tmp_path, adapt_token="t", adapt_data_root=str(root))
    r = c.post("/adapt", json={"data": data}, headers={"Authorization": "Bearer t"})
    assert r.status_code == 422


def test_adapt_launches_defect_adapt(tmp_path):
    root = tmp_path / "labelled"
    (root / "new").mkdir(parents=True)
    c = _client(tmp_path, adapt_token="t", adapt_data_root=str(root))
    r = c.post("/adapt", json={"data": "new", "shots": 5, "reason": "lamp"}, headers={"Authorization": "Bearer t"})
    assert r.status_code == 202, r.text
    out = r.json()
    assert out["started"] and out["line"] == "l1" and out["data"] == str((root / "new").resolve())
    log = Path(out["log"])
    deadline = time.time() + 60
    while time.time() < deadline and "error" not in log.read_text():
        time.sleep(0.5)
    # the real command ran and refused the empty folder with a clear message
    assert "error" in log.read_text() and "new" in log.read_text()
