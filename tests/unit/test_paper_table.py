"""cl-report --layout table (reporting/paper_table.py): rows, order columns, Avg, intervals."""
from pathlib import Path

from cl_runner.reporting.paper_table import cell_text, column_of, paper_tables, row_of
from cl_runner.reporting.report import RunResult


def run(row, rank, order, seed, acc, bwt=None, strategy="seq_ft", model="t5", name="olora_standard"):
    config = {"task_stream.order": order, "seed": str(seed)}
    if row is not None:
        config.update({"paper_table.row": row, "paper_table.rank": str(rank), "paper_table.name": name})
    return RunResult(path=Path(f"/r/{row}_{order}_{seed}"), run_id=f"{row}_{order}_{seed}", model=model,
                     stream="s", strategy=strategy, ACC=acc, BWT=bwt, config=config, seed=seed)


def test_cell_is_percent_mean_with_the_t_half_width():
    # 0.70, 0.80: mean 75.0, s = 0.0707, t(0.975, 1) = 12.706 -> 12.706 * 0.0707 / sqrt(2) = 0.6353
    assert cell_text([0.70, 0.80]) == "75.0 ± 63.5"
    assert cell_text([0.755]) == "75.5"
    assert cell_text([]) == "-"


def test_rows_by_rank_columns_by_order_and_the_average_over_orders():
    runs = [run("EWC", 5, "order2", 0, 0.60), run("SeqFT", 1, "order1", 0, 0.40), run("EWC", 5, "order1", 0, 0.70),
            run("SeqFT", 1, "order2", 0, 0.50)]
    lines = paper_tables(runs).splitlines()
    table = [line for line in lines if line.startswith("| ")]
    assert table[0] == "| method | order1 | order2 | Avg |"
    assert table[2] == "| SeqFT | 40.0 | 50.0 | 45.0 |"
    assert table[3] == "| EWC | 70.0 | 60.0 | 65.0 |"
    assert "Table olora_standard: 4 runs, seeds 0" in lines[0]


def test_average_interval_over_seeds_that_ran_every_order():
    # seed 0: orders 0.4, 0.6 -> 0.5; seed 1: 0.6, 0.8 -> 0.7; mean 0.6, s = 0.1414, t(1) -> 12.706 * 0.1 = 1.2706
    runs = [run("SeqFT", 1, "order1", 0, 0.4), run("SeqFT", 1, "order2", 0, 0.6),
            run("SeqFT", 1, "order1", 1, 0.6), run("SeqFT", 1, "order2", 1, 0.8)]
    row = [line for line in paper_tables(runs).splitlines() if line.startswith("| SeqFT")][0]
    assert row == "| SeqFT | 50.0 ± 127.1 | 70.0 ± 127.1 | 60.0 ± 127.1 |"


def test_one_order_puts_the_metrics_in_columns_and_a_missing_value_is_a_dash():
    runs = [run("SeqFT", 1, "trace", 0, 0.48, -0.08), run("GEM", 5, "trace", 0, 0.50, None)]
    table = [line for line in paper_tables(runs, ("ACC", "BWT")).splitlines() if line.startswith("| ")]
    assert table[0] == "| method | ACC | BWT |"
    assert table[2:] == ["| SeqFT | 48.0 | -8.0 |", "| GEM | 50.0 | - |"]


def test_a_run_outside_a_table_is_its_strategy_label_and_a_listed_order_its_arrows():
    loose = run(None, 0, "['amazon', 'sst-2']", 0, 0.5, strategy="ewc", model="minilm+lora")
    assert row_of(loose)[1] == "ewc (lora)"
    assert column_of(loose) == "amazon→sst-2"
