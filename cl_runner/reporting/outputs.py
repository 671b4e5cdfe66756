"""The names of what a run leaves in its folder (results/<experiment>/<run>/), in one
place for the code that writes them and the code that reads them back (resume, cl-report,
the scripts)."""
from __future__ import annotations

CONFIG_FILE = "config.yaml"  # the resolved, validated run config (written before anything is built)
METRICS_FILE = "metrics.json"  # written once, at the end: a run with it is finished
ENVIRONMENT_FILE = "environment.json"  # host, versions, command, per start
ACCURACY_FILE = "R.csv"
MONITOR_FILE = "monitor.csv"
CHECKPOINTS_DIR = "checkpoints"
