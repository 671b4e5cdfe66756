"""The README stays short and every relative link in it and in docs/ resolves."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCS = sorted((REPO / "docs").glob("*.md"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"\s", "-", re.sub(r"[^\w\s-]", "", title)))
    return out


def test_readme_is_short():
    size = len((REPO / "README.md").read_bytes())
    assert size <= 15 * 1024, f"README.md is {size} bytes; move detail to docs/"


@pytest.mark.parametrize("page", [REPO / "README.md", *DOCS], ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    broken = []
    for target in LINK.findall(page.read_text()):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text()):
            broken.append(target)
    assert not broken, f"{page.name}: links that do not resolve: {broken}"


def _results_section():
    spec = importlib.util.spec_from_file_location("results_section", REPO / "scripts" / "results_section.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_results_section_is_written_from_the_committed_comparisons():
    """The README's results tables are never edited by hand: re-writing them from
    results/reproduce/*/comparison_seeds.csv gives the README back unchanged."""
    module = _results_section()
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert module.rewrite(readme, module.section()) == readme, "run: python scripts/results_section.py"


def test_results_section_table_from_a_hand_made_csv(tmp_path):
    module = _results_section()
    folder = tmp_path / "results" / "reproduce" / module.SOURCES[0][0]
    folder.mkdir(parents=True)
    header = ("stream,tasks,model,strategy,n_seeds,ACC_mean,ACC_low,ACC_high,ACC_interval,BWT_mean,BWT_low,BWT_high,"
              "BWT_interval,monitor_change,baseline,ACC_diff_mean,ACC_diff_low,ACC_diff_high,ACC_diff_excludes_0,"
              "BWT_diff_mean,BWT_diff_low,BWT_diff_high,BWT_diff_excludes_0,step_time_ratio,peak_memory_ratio")
    rows = ["s,a b,m,seq_ft,3,0.5,0.4,0.6,t,-0.3,-0.4,-0.2,t,,seq_ft,,,,,,,,,1.0,1.0",
            "s,a b,m,ewc,3,0.6,0.55,0.65,t,-0.1,-0.15,-0.05,t,0.02,seq_ft,0.1,0.05,0.15,True,0.2,-0.1,0.5,False,1.5,2.25",
            "s,a b,m+lora,olora,1,0.55,0.5,0.62,bootstrap,,,,,,seq_ft,,,,,,,,,0.5,"]
    (folder / "comparison_seeds.csv").write_text("\n".join([header, *rows]) + "\n")
    lines = module.section(tmp_path).splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0].startswith("| strategy | seeds | ACC | BWT | ΔACC vs seq_ft")
    assert table[2] == "| ewc | 3 | 0.600 ± 0.050 | -0.100 ± 0.050 | +0.100* | +0.200 | 1.50× | 2.25× | +0.020 |"
    assert table[3] == "| olora (lora) | 1 | 0.550 (0.500–0.620) | - | - | - | 0.50× | - | - |"
    assert table[4].startswith("| seq_ft | 3 | 0.500 ± 0.100 | -0.300 ± 0.100 | - | - | 1.00× | 1.00× |")
    assert lines[0] == module.BEGIN and lines[-1] == module.END


def test_results_section_links_a_comparison_kept_out_of_the_readme(tmp_path):
    module = _results_section()
    folder, title, in_readme = next(s for s in module.SOURCES if not s[2])
    base = tmp_path / "results" / "reproduce" / folder
    base.mkdir(parents=True)
    (base / "comparison_seeds.csv").write_text("strategy,model,n_seeds,ACC_mean\nseq_ft,m,1,0.5\n")
    lines = module.section(tmp_path).splitlines()
    assert f"**{title}**: [results/reproduce/{folder}](results/reproduce/{folder}/comparison.md)." in lines
    assert not any(line.startswith("| ") for line in lines)


def test_writing_a_strategy_names_the_whole_contract():
    """Every public hook and declared fact of Strategy, every field of StrategyContext and
    every registration field appears in docs/writing_a_strategy.md (in backticks)."""
    import dataclasses
    import inspect

    from cl_runner.strategies import registry
    from cl_runner.strategies.base import Strategy, StrategyContext

    page = (REPO / "docs" / "writing_a_strategy.md").read_text()
    hooks = [n for n, v in vars(Strategy).items() if not n.startswith("_") and inspect.isfunction(v)]
    facts = [n for n in Strategy.__annotations__ if not n.startswith("_") and n != "name"]
    context = [f.name for f in dataclasses.fields(StrategyContext)]
    fields = [f.name for f in dataclasses.fields(registry.Registration)]
    register_args = [p for p in inspect.signature(registry.register).parameters]
    missing = [n for n in hooks + facts + context + fields + register_args if f"`{n}" not in page]
    assert not missing, f"docs/writing_a_strategy.md does not mention: {missing}"
    assert len(hooks) >= 20 and "memory_estimate" in hooks and "check_run_config" in hooks
