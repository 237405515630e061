"""Keep BENCHMARKS.md as named sections that each benchmark script replaces on its own."""

from __future__ import annotations

import platform
import re
from pathlib import Path


def machine_line() -> str:
    import os

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
        isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "amx_int8") if f" {f}" in flags]
    except OSError:
        isa = []
    return f"{cpu}, {len(os.sched_getaffinity(0))} cores usable, ISA {'/'.join(isa) or 'n/a'}, {platform.python_version()}"


def update_section(path: Path, name: str, body: str) -> None:
    """Replace (or append) the block between ``<!-- bench:name -->`` markers."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n\nEvery number below names the command that produced it.\n"
    block = f"{start}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
