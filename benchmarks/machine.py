"""Which processor a benchmark ran on: this project's machine changes between sessions (AMD EPYC
Zen 5 and Zen 4 with AVX-512, Zen 2 without, an Intel Xeon with), and its speed with it."""
from __future__ import annotations

from pathlib import Path


def cpu_model() -> str:
    """The processor as /proc/cpuinfo names it, with its family and model (AMD's family 23 is Zen 2, 25
    Zen 4, 26 Zen 5; Intel's family 6 spans generations, its model tells them apart)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()[:30]
    except OSError:
        return "unknown"
    info = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in lines if ":" in line)}
    avx512 = "avx512f" in info.get("flags", "").split()
    return (f"{info.get('model name', '?')} (family {info.get('cpu family', '?')} model {info.get('model', '?')}, "
            f"AVX-512: {avx512})")
