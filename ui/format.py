"""Human-readable numbers for the pages: bytes, parameter counts, seconds, dollars. Pure functions (no Streamlit)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runner.jobs.runfiles import PeakMemory

GIB = 1024**3  # bytes in a GiB: GPU memory is sold and reported by drivers in binary units
_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def fmt_bytes(n: int | float | None) -> str:
    """Bytes in binary units, e.g. 1536 -> '1.5 KiB'. None -> '-'."""
    if n is None:
        return "-"
    value = float(n)
    for unit in _BYTE_UNITS:
        if abs(value) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    return f"{value:.2f} PiB"


def gib(n: int | float | None) -> float | None:
    """Bytes to GiB as a float (for charts)."""
    return None if n is None else float(n) / GIB


def fmt_params(n: int | float | None) -> str:
    """Parameter count with a suffix, e.g. 6_738_415_616 -> '6.74 B'. None -> '-'."""
    if n is None:
        return "-"
    n = float(n)
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suffix}"
    return f"{n:.0f}"


def fmt_seconds(s: float | None) -> str:
    """Duration in seconds as '1 h 02 min', '3 min 05 s' or '12.3 s'. None -> '-'."""
    if s is None:
        return "-"
    s = float(s)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    if s < 86400 * 2:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    return f"{s / 86400:.1f} days"


def fmt_hours(h: float | None) -> str:
    """Duration given in hours, formatted like fmt_seconds."""
    return "-" if h is None else fmt_seconds(h * 3600.0)


def fmt_usd(x: float | None) -> str:
    """US dollars: '$1,234' or '$0.42'. None -> '-'."""
    if x is None:
        return "-"
    return f"${x:,.2f}" if x < 100 else f"${x:,.0f}"


def fmt_flops(x: float | None) -> str:
    """FLOPs with an SI suffix, e.g. 3.1e18 -> '3.10 EFLOP'."""
    if x is None:
        return "-"
    for div, suffix in ((1e21, "ZFLOP"), (1e18, "EFLOP"), (1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP")):
        if x >= div:
            return f"{x / div:.2f} {suffix}"
    return f"{x:.3g} FLOP"


def last_user_turn(prompt: str) -> str:
    """The text of the last user turn of a ChatML-rendered prompt (the prompt itself when it is plain text)."""
    marker = "<|im_start|>user\n"
    if marker not in prompt:
        return prompt
    return prompt.rsplit(marker, 1)[1].split("<|im_end|>", 1)[0].strip()


#: What report.json's ``peak_memory.kind`` measures (runner/jobs/runfiles.py PeakMemory), as shown on the Runs page.
PEAK_KINDS = {"cuda_max_allocated": "CUDA max allocated", "cpu_max_rss": "CPU max RSS"}


def fmt_peak(peak: PeakMemory | None) -> str:
    """report.json ``peak_memory`` as e.g. '812.40 MiB (CPU max RSS)'. None -> '-'."""
    if peak is None:
        return "-"
    return f"{fmt_bytes(peak.bytes)} ({PEAK_KINDS[peak.kind]})"
