"""Run under torchrun by tests/test_distributed.py: several 2-process trainings in one launch.

Process start dominates the cost of a distributed test, so one launch runs every scenario
in the same process group: DDP and FSDP2, full and LoRA, and a resume of the FSDP2 run
from its step-3 sharded checkpoint. Usage: torchrun ... dist_worker.py ROOT MODEL DATA PAIRS.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import (COMPILED_SCENARIOS, PREFERENCE_SCENARIOS, RUN, SCENARIOS,  # noqa: E402
                         compiled_layers, interrupted_copy)


def main(root: Path, model: str, data: str, pairs: str) -> None:
    """Each scenario into ROOT/NAME (PAIRS for the preference ones); then ROOT/resumed-2 continues ROOT/fsdp-full."""
    from tunesmith.train.api import finetune

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    for name, options in SCENARIOS.items():
        finetune(model=model, data=data, output=str(root / name), **RUN, **options)
    for name, options in PREFERENCE_SCENARIOS.items():
        finetune(model=model, data=pairs, output=str(root / name), **{**RUN, **options})
    for name, options in COMPILED_SCENARIOS.items():
        with compiled_layers(root / f"{name}-compile-{rank}.json"):
            finetune(model=model, data=data, output=str(root / name), **RUN, **options)
    if rank == 0:
        interrupted_copy(root / "fsdp-full", root / "resumed-2")
        interrupted_copy(root / "fsdp-full", root / "resumed-1")  # for the one-process resume in the test
    torch.distributed.barrier()
    finetune(model=model, data=data, output=str(root / "resumed-2"), resume=True, **RUN,
             **SCENARIOS["fsdp-full"])
    torch.distributed.destroy_process_group()
    if rank == 0:
        shutil.rmtree(root / "resumed-1" / ".cache", ignore_errors=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4])
