"""A ``torchrun`` worker for tests/zo/test_distributed.py: several qzo runs in one distributed job.

Starting ranks costs most of a short run (two interpreters importing torch and
transformers), so one job runs every configuration the tests compare, through the same
``qzo.train.loop.train`` that ``torchrun -m qzo train`` calls, then resumes one of them.

    torchrun --standalone --nproc-per-node 2 tests/distributed_worker.py JOBS.json
JOBS.json: {"runs": {name: [overrides]}, "resume": {"from": name, "to": folder, "drop_step": N}}
"""

import datetime
import json
import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from qzo.train.loop import train


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))  # the runs reuse this group
    for name, sets in jobs["runs"].items():
        train(None, sets, log=lambda _: None, progress=False)
    resume = jobs.get("resume")
    if resume:
        again = Path(resume["to"])
        if dist.get_rank() == 0:  # as if stopped after an earlier checkpoint: the later one and the end are gone
            shutil.copytree(resume["from"], again)
            shutil.rmtree(again / "checkpoints" / f"step-{resume['drop_step']:06d}")
            for name in ("adapter", "summary.json", "best", "best.json"):
                path = again / name
                shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        dist.barrier()
        train(None, None, resume=again, log=lambda _: None, progress=False)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
