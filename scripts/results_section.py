"""Write README.md's results section from the committed evidence comparisons, so that its
numbers are never copied by hand: each table is read from a comparison_seeds.csv that
scripts/compare_strategies.py (through cl-report) wrote under results/reproduce/.

    python scripts/results_section.py            # rewrite the section between the markers
    python scripts/results_section.py --check    # exit 1 when README.md is out of date

tests/unit/test_docs.py runs the check, so a re-run comparison without a re-written README
fails the suite.
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEGIN = "<!-- results:begin (written by scripts/results_section.py from results/reproduce/; do not edit) -->"
END = "<!-- results:end -->"
# (folder under results/reproduce, what it is, its table in the README or only a link): the
# evidence comparisons, in README order. The README has room for the tables that decide
# something; smollm2_quick's 12 test items a task decide little, so it is a link.
SOURCES = (
    ("minilm_learnable", "MiniLM (22M encoder classifier), amazon → SST-2 → agnews, 500 train / 500 test "
                         "items a task", True),
    ("minilm_learnable/issue19", "The same stream, a later batch with its own seq_ft runs (time/step: a mean over "
                                 "seeds that shared the CPU; seed-0 ratios in its README)", True),
    ("minilm_learnable/issue20", "L2P, ProgPrompt, MbPA++ on the same stream", False),
    ("smollm2_quick", "SmolLM2-135M-Instruct, four tasks as generation, 12 test items a task", False),
)


def _number(text: str):
    return float(text) if text not in ("", None) else None


def interval_text(row: dict, metric: str, signed: bool = False) -> str:
    """`0.573 ± 0.021` for a t interval over seeds, `0.573 (0.541–0.606)` for a bootstrap."""
    mean, low, high = (_number(row[f"{metric}_{k}"]) for k in ("mean", "low", "high"))
    if mean is None:
        return "-"
    fmt = "{:+.3f}" if signed else "{:.3f}"
    if low is None or high is None:
        return fmt.format(mean)
    if row.get(f"{metric}_interval") == "t":
        return f"{fmt.format(mean)} ± {(high - low) / 2:.3f}"
    return f"{fmt.format(mean)} ({fmt.format(low)}–{fmt.format(high)})"


def difference_text(row: dict, metric: str) -> str:
    """The paired difference from the baseline, `+0.120*` (* = its 95% interval excludes 0;
    the interval itself is in the folder's comparison.md)."""
    mean = _number(row.get(f"{metric}_diff_mean", ""))
    if mean is None:
        return "-"
    return f"{mean:+.3f}" + ("*" if row.get(f"{metric}_diff_excludes_0") == "True" else "")


def ratio_text(row: dict, key: str) -> str:
    value = _number(row.get(key, ""))
    return "-" if value is None else f"{value:.2f}×"


def table(csv_path: Path) -> str:
    with open(csv_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: -(_number(r["ACC_mean"]) or 0.0))
    baseline = next((r["baseline"] for r in rows if r.get("baseline")), "seq_ft")
    monitor = any(r.get("monitor_change") for r in rows)
    headers = ["strategy", "seeds", "ACC", "BWT", f"ΔACC vs {baseline}", f"ΔBWT vs {baseline}",
               "time/step", "memory"] + (["monitor Δ"] if monitor else [])
    lines = ["| " + " | ".join(headers) + " |", "| --- | ---: |" + " ---: |" * (len(headers) - 2)]
    for r in rows:
        adapter = r["model"].partition("+")[2]
        name = f"{r['strategy']} ({adapter})" if adapter else r["strategy"]
        cells = [name, r["n_seeds"], interval_text(r, "ACC"), interval_text(r, "BWT", signed=True),
                 difference_text(r, "ACC"), difference_text(r, "BWT"),
                 ratio_text(r, "step_time_ratio"), ratio_text(r, "peak_memory_ratio")]
        if monitor:
            change = _number(r.get("monitor_change", ""))
            cells.append("-" if change is None else f"{change:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(root: Path = REPO) -> str:
    parts = [BEGIN, ""]
    for folder, title, in_readme in SOURCES:
        base = root / "results" / "reproduce" / folder
        csv_path = base / "comparison_seeds.csv"
        if not csv_path.is_file():
            continue
        page = "README.md" if (base / "README.md").is_file() else "comparison.md"
        link = f"[results/reproduce/{folder}](results/reproduce/{folder}/{page})"
        parts += [f"**{title}** ({link}):", "", table(csv_path), ""] if in_readme else [f"**{title}**: {link}.", ""]
    parts += ["Mean ± 95% CI (t over seeds; one seed: a bootstrap over test items, in parentheses). Δ: the mean "
              "paired difference, * = its interval excludes 0; adapter runs are "
              "compared with the adapter's own seq_ft. time/step and memory (peak RSS): ratios to full-model seq_ft "
              "in the same comparison.", "", END]
    return "\n".join(parts)


def rewrite(readme: str, new_section: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no results markers; put these two lines where the section goes:\n{BEGIN}\n{END}")
    head, _, rest = readme.partition(BEGIN)
    _, _, tail = rest.partition(END)
    return head + new_section + tail


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when README.md's section is out of date")
    args = parser.parse_args(argv)
    path = REPO / "README.md"
    current = path.read_text(encoding="utf-8")
    wanted = rewrite(current, section())
    if args.check:
        if wanted != current:
            print("README.md's results section is out of date: run python scripts/results_section.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(wanted, encoding="utf-8")
    print(f"rewrote the results section of {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
