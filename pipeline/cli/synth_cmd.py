"""`defect synth`: write a synthetic line dataset for trying the pipeline without data."""

from __future__ import annotations

from pathlib import Path

import click

from pipeline import synth as synth_mod


@click.command("synth")
@click.argument("out_dir", type=click.Path(file_okay=False, dir_okay=True, writable=True, path_type=Path))
@click.option("--n", "n", type=click.IntRange(min=1), default=40, show_default=True,
              help="Images per defect class (good gets N x --good-multiplier).")
@click.option("--exposure", type=click.FloatRange(synth_mod.MIN_EXPOSURE, synth_mod.MAX_EXPOSURE), default=1.0,
              show_default=True, help="Lighting/exposure: 1.0 nominal, >1 brighter, <1 darker (a domain shift).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Random seed; use different seeds for train and test sets.")
@click.option("--size", type=click.IntRange(synth_mod.MIN_SIZE, synth_mod.MAX_SIZE), default=160,
              show_default=True, help="Approximate image side in pixels.")
@click.option("--good-multiplier", type=click.IntRange(min=1), default=3, show_default=True,
              help="Good images per defect image, as on a real, imbalanced line.")
@click.option("--masks", "masks_dir", type=click.Path(file_okay=False, dir_okay=True, writable=True, path_type=Path),
              help="Also write the defect images' pixel masks here (MASKS/<class>/<same name>), for train --masks.")
def synth(out_dir: Path, n: int, exposure: float, seed: int, size: int, good_multiplier: int,
          masks_dir: Path | None) -> None:
    """Write a synthetic image-folder dataset OUT_DIR/<class>/*.png and print counts per class."""
    if masks_dir is not None and masks_dir.resolve().is_relative_to(out_dir.resolve()):
        raise click.BadParameter("must be outside OUT_DIR (a folder inside it would be read as a class)",
                                 param_hint="--masks")
    counts = synth_mod.generate_dataset(out_dir, n=n, exposure=exposure, seed=seed, size=size,
                                        good_multiplier=good_multiplier, masks_dir=masks_dir)
    width = max(len(k) for k in counts)
    for kind, count in counts.items():
        click.echo(f"{kind:<{width}}  {count}")
    click.echo(f"{'total':<{width}}  {sum(counts.values())}  -> {out_dir}")
