"""`defect` commands for the serve area: ``serve`` and ``results`` (defined in ``pipeline.serve.cli``)."""

from __future__ import annotations

import click

from pipeline.serve.cli import results, serve

commands: list[click.Command] = [serve, results]
