"""`defect` commands for the serve area."""

from __future__ import annotations

import click

commands: list[click.Command] = []
