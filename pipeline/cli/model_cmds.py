"""`defect` commands for the model's life before serving: synth, train, evaluate, export, predict."""

from __future__ import annotations

import click

commands: list[click.Command] = []
