"""`defect` commands for the drift area."""

from __future__ import annotations

import click

commands: list[click.Command] = []
