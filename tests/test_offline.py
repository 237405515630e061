"""Air-gapped defaults: the CLI turns Prefect's analytics off unless the site set them explicitly."""

from __future__ import annotations

import os

from click.testing import CliRunner

from pipeline.cli import main
from pipeline.offline import OFFLINE_ENV, apply_offline_defaults


def test_offline_defaults_fill_gaps_and_keep_explicit_settings():
    env = {"DO_NOT_TRACK": "0"}
    apply_offline_defaults(env)
    assert env == {"DO_NOT_TRACK": "0", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def test_every_cli_command_runs_with_analytics_off(monkeypatch, tmp_path):
    for key in OFFLINE_ENV:
        monkeypatch.delenv(key, raising=False)
    result = CliRunner().invoke(main, ["results", str(tmp_path / "missing.sqlite")])
    assert result.exit_code != 0  # a missing database is an error; the group ran first
    assert {k: os.environ.get(k) for k in OFFLINE_ENV} == OFFLINE_ENV
