"""How numbers read, shared by the run summary (cl-run) and cl-report: metrics with three
decimals (BWT, FWT and differences signed), intervals as `0.600 ± 0.248`, durations and
byte sizes in human units."""
from __future__ import annotations

from typing import Optional, Sequence

# Metrics read with a sign: a transfer (or a difference) is good or bad by its sign.
SIGNED_METRICS = frozenset({"BWT", "FWT"})
DIGITS = 3


def format_metric(value: Optional[float], signed: bool = False) -> str:
    """0.467, -0.750 / +0.000 when signed; "-" when missing."""
    if value is None:
        return "-"
    return f"{value:+.{DIGITS}f}" if signed else f"{value:.{DIGITS}f}"


def format_named_metric(name: str, value: Optional[float]) -> str:
    """`format_metric` with the sign convention of the metric `name`."""
    return format_metric(value, signed=name in SIGNED_METRICS)


def format_interval(interval, signed: bool = False) -> str:
    """`0.600 ± 0.248` (a t interval), `0.600 [0.512, 0.688]` (a bootstrap one, not
    symmetric), `0.600` alone when there is no interval, "-" when there is no value."""
    if interval is None or interval.mean is None:
        return "-"
    mean = format_metric(interval.mean, signed)
    if interval.method == "t":
        return f"{mean} ± {interval.half_width:.{DIGITS}f}"
    if interval.method == "bootstrap":
        return f"{mean} [{format_metric(interval.low, signed)}, {format_metric(interval.high, signed)}]"
    return mean


def format_duration(seconds: Optional[float]) -> str:
    """42.0s, 12m05s, 3h07m."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_bytes(num_bytes: Optional[float]) -> str:
    """Binary units: 512.0 MiB, 1.50 GiB."""
    if num_bytes is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if num_bytes >= size:
            return f"{num_bytes / size:.2f} {unit}" if unit == "GiB" else f"{num_bytes / size:.1f} {unit}"
    return f"{int(num_bytes)} B"


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int) -> str:
    """Aligned plain-text table: the first `text_columns` columns left, the rest right."""
    widths = [max(len(headers[c]), *(len(row[c]) for row in rows)) for c in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if c < text_columns else cell.rjust(w) for c, (cell, w) in enumerate(zip(cells, widths))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(row) for row in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], text_columns: int) -> str:
    align = ["---"] * text_columns + ["---:"] * (len(headers) - text_columns)
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)
