"""What a run leaves and how runs are compared.

run side   tracking.py (the run folder, its files, W&B), summary.py (metrics.json, the
           printed summary, the final model), plots.py
cl-report  report.py (the command), seed_groups.py and stats.py (seeds pooled, intervals,
           paired differences), seed_tables.py, item_scores.py (per-item scores for the
           bootstrap)
shared     formatting.py: how numbers, durations, bytes and tables read, in the run
           summary and in cl-report alike
"""
