"""The ``defect`` command. Each area keeps its commands in its own module; none holds logic.

Only the command modules are imported here, and they import torch lazily inside the
commands that train or export, so ``defect serve`` on an inference host never loads torch.
"""

from __future__ import annotations

import logging

import click

from pipeline.cli import adapt_cmd, drift_cmds, export_cmd, model_cmds, registry_cmds, serve_cmds
from pipeline.offline import apply_offline_defaults


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """Few-shot visual defect inspection: train, export, serve, watch drift, re-adapt."""
    apply_offline_defaults()
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


for _module in (model_cmds, export_cmd, serve_cmds, registry_cmds, drift_cmds, adapt_cmd):
    for _cmd in _module.commands:
        main.add_command(_cmd)
