"""Many tiny cl-run runs in one multi-process launch: each rank runs every case in order,
in-process, as `cl-run <overrides>` would, so the conformance tests pay for one torchrun
start (imports, the process group) instead of one per strategy.

    python -m torch.distributed.run --standalone --nproc_per_node 2 -m tests.helpers.batch_runs CASES.json OUT

CASES.json: {"case id": [overrides...], ...}. Case k writes its run to OUT/<id>/ and rank 0
writes OUT/<id>.status.json: {"ok": true} or {"ok": false, "error": "..."}. The process group
stays up between cases (a run's teardown would destroy it) and is released at the end.
"""
from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path


def main(cases_file: str, out: str) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import cl_runner.training.run as run_module
    from cl_runner.cli import execute
    from tests.helpers import compose

    run_module.release = lambda accelerator: None  # keep the group for the next case
    cases = json.loads(Path(cases_file).read_text())
    rank = int(os.environ.get("RANK", "0"))
    failed = 0
    for case, overrides in cases.items():
        status: dict = {"ok": True}
        try:
            execute(compose(["logger=none", "trainer.progress_bar=false", *overrides,
                             f"output_dir={Path(out) / case}"]))
        except BaseException as err:  # noqa: BLE001 - reported per case, the batch goes on
            status = {"ok": False, "error": f"{type(err).__name__}: {err}",
                      "traceback": traceback.format_exc()[-3000:]}
            failed += 1
        if rank == 0:
            (Path(out) / f"{case}.status.json").write_text(json.dumps(status))
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
