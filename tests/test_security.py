"""The security promises of deploy/SECURITY.md, each as a test that fails when it is broken: loopback by
default, the adapt token, upload and body limits, no path traversal (hot folder, HTTP parameters, adapt
data path, registry names), only safe deserialisation, models refused unless the registry's checksum
matches, and dependencies pinned to the known-good set."""

from __future__ import annotations

import ast
import os
import socket
import time
import tomllib
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.metadata import load_metadata, save_metadata, sha256_file
from pipeline.registry import InvalidNameError, Registry, line_dir, model_dir, validate_name
from pipeline.runtime import RuntimeOptions
from pipeline.serve.config import ServeSettings, parse_host_port
from pipeline.serve.http import create_app
from pipeline.serve.metrics import ServeMetrics
from pipeline.serve.models import ModelHolder, ModelLocator, ModelRefused
from pipeline.serve.store import ResultRow, ResultStore, utc_iso
from tests.test_serve_daemon import count_rows, drop, free_port, metric, png, rows, served  # noqa: F401 (fixture)
from tests.tiny_model import make_tiny_model

REPO = Path(__file__).resolve().parents[1]


# -- network exposure --------------------------------------------------------------------------------------


def test_http_binds_loopback_unless_a_host_is_given():
    assert parse_host_port("8080") == ("127.0.0.1", 8080)
    assert parse_host_port(":8080") == ("127.0.0.1", 8080)
    assert parse_host_port("0.0.0.0:8080") == ("0.0.0.0", 8080)  # exposing it is an explicit choice
    s = ServeSettings(model="m.onnx", db="r.sqlite", http="9000")
    assert s.http_address == ("127.0.0.1", 9000)
    assert ServeSettings.model_fields["http"].default is None  # no HTTP at all unless asked for
    assert ServeSettings.model_fields["adapt_token"].default is None  # POST /adapt off by default


def _listening_addresses(port: int) -> list[str]:
    """Local addresses of LISTEN sockets on ``port`` (from /proc/net/tcp{,6})."""
    out = []
    for name in ("tcp", "tcp6"):
        path = Path("/proc/net") / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            addr, state = fields[1], fields[3]
            host, p = addr.rsplit(":", 1)
            if state == "0A" and int(p, 16) == port:
                out.append(host)
    return out


def test_daemon_given_only_a_port_listens_on_loopback_only(tiny_model, tmp_path, served):  # noqa: F811
    port = free_port()
    d = served("--model", str(tiny_model), "--db", str(tmp_path / "r.sqlite"), f"--http={port}")
    d.port = port
    health = d.wait_http()
    assert health["sources"]["http"]["address"] == f"127.0.0.1:{port}"
    assert _listening_addresses(port) == ["0100007F"]  # 127.0.0.1, and nothing else
    assert d.terminate() == 0


# -- request limits ----------------------------------------------------------------------------------------


def _raw_request(port: int, head: str, body: bytes = b"", timeout: float = 5.0) -> tuple[int, float]:
    """Send a request whose headers may promise more body than is sent; (status, seconds to the answer)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head.encode() + b"\r\n" + body)
        data = s.recv(4096)
    return int(data.split(b" ", 2)[1]), time.monotonic() - t0


def test_oversized_requests_are_refused_before_their_body_is_read(tiny_model, tmp_path, served,  # noqa: F811
                                                                   monkeypatch):
    """A client announcing a 1 GB body gets its answer at once, without the daemon waiting for (or
    buffering) the body: /predict (413), and /adapt without a token (404) or with a wrong one (401)."""
    port = free_port()
    monkeypatch.setenv("DEFECT_ADAPT_TOKEN", "s3cret-token")
    d = served("--model", str(tiny_model), "--db", str(tmp_path / "r.sqlite"), "--http", f"127.0.0.1:{port}",
               "--max-upload-bytes", "100000")
    d.wait_http()
    huge = "Content-Length: 1000000000\r\n"
    status, s = _raw_request(port, f"POST /predict HTTP/1.1\r\nHost: x\r\n{huge}", b"\0" * 100)
    assert status == 413 and s < 3
    status, s = _raw_request(port, f"POST /adapt HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{huge}",
                             b"{")
    assert status == 401 and s < 3, "POST /adapt read the body before checking the token"
    status, s = _raw_request(port, "POST /adapt HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret-token\r\n"
                                   f"Content-Type: application/json\r\n{huge}", b"{")
    assert status == 413 and s < 3
    c = httpx.Client(base_url=d.url, timeout=10)
    assert c.post("/predict", content=b"x" * 100_001).status_code == 413
    assert c.post("/predict", content=b"--b\r\nbroken", headers={"content-type": "multipart/form-data; boundary=b"}
                  ).status_code == 400
    text = c.get("/metrics").text
    assert metric(text, "defect_rejected_total", '{reason="too_large"}') == 2
    assert d.proc.poll() is None and d.terminate() == 0


def _app(tmp_path: Path, **overrides) -> TestClient:
    store = ResultStore(tmp_path / "r.sqlite")
    store.insert_many([ResultRow(ts=utc_iso(), source="http", decision="good", label="good")])
    base = dict(adapt_token=None, adapt_data_root=None, registry_mode=True, line="l1", model=str(tmp_path / "m"),
                db=str(tmp_path / "r.sqlite"), max_upload_bytes=1000, request_timeout_s=1.0)
    daemon = SimpleNamespace(settings=SimpleNamespace(**{**base, **overrides}), store=store, metrics=ServeMetrics(),
                             stopping=False)
    return TestClient(create_app(daemon))


@settings(max_examples=60, deadline=None, database=None)
@given(since=st.one_of(st.none(), st.text(max_size=40), st.just("2025-01-01' OR 1=1 --")),
       limit=st.one_of(st.none(), st.integers(-10**6, 10**6), st.text(max_size=10)))
def test_results_parameters_never_reach_sql_unchecked(tmp_path_factory, since, limit):
    client = _app(tmp_path_factory.mktemp("results"))
    params = {k: v for k, v in (("since", since), ("limit", limit)) if v is not None}
    r = client.get("/results", params=params)
    assert r.status_code in (200, 400, 422), r.text
    if r.status_code == 200:
        assert isinstance(r.json(), list) and len(r.json()) <= 10_000


def test_adapt_data_path_cannot_escape_its_root_through_a_link(tmp_path):
    root, outside = tmp_path / "labelled", tmp_path / "secret"
    root.mkdir()
    outside.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    client = _app(tmp_path, adapt_token="t", adapt_data_root=str(root))
    auth = {"Authorization": "Bearer t"}
    for data in ("link", "link/..", "../secret", str(outside), "..", "%2e%2e/secret", "./../secret"):
        r = client.post("/adapt", json={"data": data}, headers=auth)
        assert r.status_code == 422, (data, r.status_code, r.text)
    assert client.post("/adapt", content=b"[1, 2]", headers={**auth, "content-type": "application/json"}
                       ).status_code == 422
    assert client.post("/adapt", json={"data": "x"}, headers={"Authorization": "Bearer T"}).status_code == 401
    assert client.post("/adapt", json={"data": "x"}, headers={"Authorization": "t"}).status_code == 401
    assert client.post("/adapt?token=t", json={"data": "x"}).status_code == 401  # never from the URL


# -- hot folder: links and traversal -----------------------------------------------------------------------


def test_hot_folder_never_reads_or_writes_through_symbolic_links(tiny_model, tmp_path, served):  # noqa: F811
    """Whoever can write to the inbox must not make the daemon read files elsewhere (their sha256 would
    land in the results), nor move or write anything outside the inbox through a planted link."""
    watch, db, outside = tmp_path / "in", tmp_path / "r.sqlite", tmp_path / "outside"
    watch.mkdir()
    outside.mkdir()
    secret = outside / "secret.png"
    secret.write_bytes(png(200, seed=1))
    (watch / "innocent.png").symlink_to(secret)
    (watch / "dir-link").symlink_to(outside, target_is_directory=True)
    drop(watch, "real.png", png(10))
    args = ("--model", str(tiny_model), "--db", str(db), "--watch", str(watch), "--poll-interval", "0.05")
    d = served(*args)
    deadline = time.monotonic() + 30
    while count_rows(db) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    got = {r.source: r for r in rows(db)}
    assert set(got) == {"folder:innocent.png", "folder:dir-link", "folder:real.png"}, d.log()
    for link in ("innocent.png", "dir-link"):  # links are quarantined as they are, never followed
        assert got[f"folder:{link}"].error_kind == "symlink" and got[f"folder:{link}"].sha256 is None
        assert (watch / "quarantine" / link).is_symlink()
    assert secret.is_file()
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png"]
    assert (watch / "done" / "real.png").is_file()

    # A link planted where the daemon moves files: done/sub -> elsewhere, then sub/after.png arrives.
    (watch / "done" / "sub").symlink_to(outside, target_is_directory=True)
    (watch / "sub").mkdir()
    drop(watch / "sub", "after.png", png(10, seed=5))
    deadline = time.monotonic() + 30
    while count_rows(db) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png"]  # nothing moved or written there
    assert (watch / "sub" / "after.png").is_file() and d.proc.poll() is None
    assert "symbolic link" in d.log()
    # done/ itself swapped for a link: that link is just another input (quarantined), done/ is made anew
    os.rename(watch / "done", watch / "done.old")
    (watch / "done").symlink_to(outside, target_is_directory=True)
    drop(watch, "later.png", png(10, seed=6))
    deadline = time.monotonic() + 30
    while not (watch / "done" / "later.png").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (watch / "done" / "later.png").is_file() and not (watch / "done").is_symlink()
    assert (watch / "quarantine" / "done").is_symlink()
    assert sorted(p.name for p in outside.iterdir()) == ["secret.png"]
    assert d.terminate() == 0
    # and a daemon refuses to start on a hot folder whose done/ is a link, saying why
    os.rename(watch / "done", watch / "done.new")
    (watch / "done").symlink_to(outside, target_is_directory=True)
    d = served(*args)
    assert d.wait_exit(30) == 1 and "symbolic link" in d.log() and "Traceback" not in d.log()


# -- registry names and checksums --------------------------------------------------------------------------


BAD_NAMES = ["..", ".", "../x", "a/../../b", "/etc", "a/b", "a\\b", ".hidden", "", "x" * 65, "a\x00b", "a b",
             "CHAMPION\n", "~root", "line\n2"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_line_and_version_names_cannot_traverse(tmp_path, name):
    with pytest.raises(InvalidNameError):
        validate_name(name, "line")
    with pytest.raises(InvalidNameError):
        line_dir(tmp_path, name)
    with pytest.raises(InvalidNameError):
        model_dir(tmp_path, "ok", name)
    reg = Registry(tmp_path / "models")
    run = make_tiny_model(tmp_path / "run").parent
    with pytest.raises(InvalidNameError):
        reg.register(name, run)
    with pytest.raises(InvalidNameError):
        reg.register("ok", run, version=name)
    with pytest.raises(InvalidNameError):
        reg.promote("ok", name)
    with pytest.raises(InvalidNameError):
        reg.show(name, "v0001")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing was created anywhere


@pytest.mark.parametrize("pointer", ["../../../etc", "/etc/passwd", "v0001/../../x", ".hidden", "CHAMPION"])
def test_a_champion_pointer_naming_a_path_is_refused_by_the_daemon(tmp_path, pointer):
    root = tmp_path / "models"
    Registry(root).register("l", make_tiny_model(tmp_path / "run").parent)
    (root / "l" / "CHAMPION").write_text(pointer + "\n")
    with pytest.raises(ModelRefused) as exc:
        ModelLocator(root, "l").resolve()
    assert exc.value.reason == "registry"


def _registered(tmp_path: Path, n: int = 2) -> tuple[Path, Registry]:
    root = tmp_path / "models"
    reg = Registry(root)
    for i in range(1, n + 1):
        reg.register("l", make_tiny_model(tmp_path / f"run{i}", bias=float(i)).parent, version=f"v{i}")
    reg.promote("l", "v1")
    return root, reg


def _swap_model_and_sidecar(vdir: Path, bias: float) -> None:
    """What someone with write access to the version folder can do: a new model with a matching sidecar."""
    other = make_tiny_model(vdir.parent.parent.parent / f"evil{bias}", bias=bias)
    meta = load_metadata(other).model_copy(update={"version": vdir.name, "line": vdir.parent.name})
    (vdir / "model.onnx").write_bytes(other.read_bytes())
    save_metadata(meta.model_copy(update={"onnx_sha256": sha256_file(vdir / "model.onnx")}), vdir / "model.json")


def test_daemon_refuses_a_model_swapped_together_with_its_sidecar(tmp_path):
    root, reg = _registered(tmp_path)
    metrics = ServeMetrics()
    holder = ModelHolder(ModelLocator(root, "l"), RuntimeOptions(), metrics, poll_interval_s=60)
    assert holder.current.version == "v1"
    _swap_model_and_sidecar(root / "l" / "v2", bias=-3.0)
    (root / "l" / "CHAMPION").write_text("v2\n")
    holder.poll()
    holder.poll()
    assert holder.take_pending().version == "v1"  # still serving v1
    assert holder.last_refusal["reason"] == "integrity" and "registry recorded" in holder.last_refusal["message"]
    assert metrics.refusals.labels("integrity")._value.get() == 1
    # ... and will not start on one either
    _swap_model_and_sidecar(root / "l" / "v1", bias=-3.0)
    (root / "l" / "CHAMPION").write_text("v1\n")
    with pytest.raises(ModelRefused) as exc:
        ModelHolder(ModelLocator(root, "l"), RuntimeOptions(), ServeMetrics())
    assert exc.value.reason == "integrity"
    with pytest.raises(Exception, match="sha256"):
        reg.load_champion("l")


def test_daemon_refuses_an_unregistered_version_folder(tmp_path):
    root, _ = _registered(tmp_path, n=1)
    hand_made = root / "l" / "v9"
    hand_made.mkdir()
    src = make_tiny_model(tmp_path / "hand")
    for f in ("model.onnx", "model.json"):
        (hand_made / f).write_bytes((src.parent / f).read_bytes())
    (root / "l" / "CHAMPION").write_text("v9\n")
    with pytest.raises(ModelRefused, match="no registry checksum") as exc:
        ModelHolder(ModelLocator(root, "l"), RuntimeOptions(), ServeMetrics())
    assert exc.value.reason == "integrity"


# -- deserialisation ---------------------------------------------------------------------------------------


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str = "<src>") -> list[str]:
    """Calls that can execute code from a file: torch.load without weights_only=True, pickle/marshal/
    dill/joblib loads, np.load(allow_pickle=True), yaml.load without a safe loader, torch.jit.load."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        where = f"{filename}:{node.lineno} {name}"
        last = name.rsplit(".", 1)[-1]
        if name.endswith("torch.load") and not _is_true(_kw(node, "weights_only")):
            found.append(where + " without weights_only=True")
        elif name.split(".")[0] in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve") \
                and last in ("load", "loads", "Unpickler", "open"):
            found.append(where)
        elif last == "load" and name.split(".")[0] in ("np", "numpy") and _is_true(_kw(node, "allow_pickle")):
            found.append(where + " with allow_pickle=True")
        elif name in ("yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load"):
            loader = _kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            if name in ("yaml.unsafe_load", "yaml.full_load") or not (loader is not None and "Safe" in _dotted(loader)):
                found.append(where + " without SafeLoader")
        elif name.endswith("jit.load"):
            found.append(where)
    return found


def test_the_scanner_finds_unsafe_loads():
    bad = """
import torch, pickle, numpy as np, yaml
torch.load(p)
torch.load(p, weights_only=False)
pickle.loads(b)
np.load(p, allow_pickle=True)
yaml.load(text)
torch.jit.load(p)
"""
    assert len(unsafe_loads(bad)) == 6
    good = """
import torch, numpy as np, yaml
torch.load(p, map_location="cpu", weights_only=True)
np.load(p, allow_pickle=False)
np.load(p)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
"""
    assert unsafe_loads(good) == []


def test_no_code_loads_untrusted_files_unsafely():
    files = [p for d in ("pipeline", "flows", "bench", "tests") for p in (REPO / d).rglob("*.py")]
    assert len(files) > 30
    found = [hit for p in files for hit in unsafe_loads(p.read_text(encoding="utf-8"), str(p.relative_to(REPO)))]
    assert found == []


# -- dependencies ------------------------------------------------------------------------------------------


def _constraints() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        assert "==" in line and not line.startswith("-"), f"constraints.txt: not an exact pin: {line!r}"
        name, version = line.split("==", 1)
        pins[canonicalize_name(name)] = version.strip()
    return pins


def test_constraints_pin_every_dependency_within_pyproject_ranges():
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _constraints()
    assert "defect-pipeline" not in pins
    installed_by_setup = list(project["dependencies"])
    for extra in ("train", "flows", "dev"):  # what `make setup` installs
        installed_by_setup += project["optional-dependencies"][extra]
    everything = installed_by_setup + [d for deps in project["optional-dependencies"].values() for d in deps]
    for text in everything:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if text in installed_by_setup:
            assert name in pins, f"{req.name} is installed by `make setup` but not pinned in constraints.txt"
        if name in pins:
            assert req.specifier.contains(Version(pins[name]), prereleases=True), \
                f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject's {req.specifier}"


def test_setup_installs_with_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert "-c constraints.txt" in makefile and "pyproject.toml constraints.txt" in makefile


def test_threat_model_is_written_down():
    text = (REPO / "deploy" / "SECURITY.md").read_text()
    for heading in ("Assets", "Actors", "Trust boundaries", "What we defend", "What we do not defend"):
        assert heading in text, heading
