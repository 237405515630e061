"""`defect` commands for the registry area."""

from __future__ import annotations

import click

commands: list[click.Command] = []
