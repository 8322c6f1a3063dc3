"""What tests/test_distributed.py and its torchrun worker share: the run options and scenarios."""
from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Packing, gradient accumulation, held-out eval and checkpoints all on; 6 optimizer steps.
RUN = dict(max_steps=6, batch_tokens=96, grad_accum=2, lr=2e-3, save_every=3, test_split=0.1, report=False,
           seed=3)
SCENARIOS = {
    "fsdp-full": dict(method="full", parallel="fsdp"),
    "ddp-lora": dict(method="lora", parallel="ddp"),
    "ddp-full": dict(method="full", parallel="ddp"),
    "fsdp-lora": dict(method="lora", parallel="fsdp"),
}
# On preference data: full-FT DPO under FSDP2, whose reference pass the ranks share out, and
# with `--reference live` (each rank keeps an unsharded frozen copy that scores its batches).
# LoRA DPO under DDP: the reference is the adapter switched off inside the wrapped forward.
PREFERENCE_SCENARIOS = {"fsdp-dpo": dict(method="full", parallel="fsdp", objective="dpo", lr=1e-3, batch_tokens=256),
                        "fsdp-dpo-live": dict(method="full", parallel="fsdp", objective="dpo", lr=1e-3,
                                              batch_tokens=256, reference="live"),
                        "ddp-lora-dpo": dict(method="lora", parallel="ddp", objective="dpo", batch_tokens=256)}


# CUDA's fast-path layers, emulated on the CPU (`compiled_layers`): LoRA on the fused node,
# decoder layers compiled with the calls that share an input grouped, then wrapped by FSDP2 as
# `tunesmith train` does on GPUs (FSDP2's hooks then sit around each compiled layer; DDP's
# reducer only sees the gradients). Checked against the plain one-process LoRA run. Each
# scenario costs ~20 s of compiling on 2 cores, so only the FSDP2 one runs.
COMPILED_SCENARIOS = {"fsdp-lora-compiled": dict(method="lora", parallel="fsdp")}


@contextlib.contextmanager
def compiled_layers(record: Path) -> Iterator[None]:
    """`prepare_for_training` as on CUDA, in the part that changes the layers: fused LoRA nodes,
    then `_compile_decoder_layers` (dynamo + AOT autograd, `aot_eager`: inductor's C++ build is
    minutes on 2 cores). Writes to `record` how many graphs were compiled, graph breaks, and how
    many LoRA calls each graph's grouping pass rewrote."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from tunesmith.model import fast, lora_graph

    original, group, rewritten = fast.prepare_for_training, lora_graph.group_lora_calls, []

    def prepare(model: Any, **kwargs: Any) -> Any:
        setup = original(model, **kwargs)
        fast.fuse_lora_layers(model)
        fast._compile_decoder_layers(fast.causal_lm(model), backend="aot_eager")
        return setup

    fast.prepare_for_training = prepare
    lora_graph.group_lora_calls = lambda gm: rewritten.append(group(gm)) or rewritten[-1]
    torch._dynamo.reset()
    counters.clear()
    try:
        yield
    finally:
        fast.prepare_for_training, lora_graph.group_lora_calls = original, group
        record.write_text(json.dumps({"graphs": counters["stats"]["unique_graphs"],
                                      "breaks": sum(counters["graph_break"].values()), "rewritten": rewritten}))
        torch._dynamo.reset()


def interrupted_copy(source: Path, target: Path) -> None:
    """`source` as it was when stopped right after its step-3 checkpoint (later checkpoint and results gone)."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / "step-000006")
    for name in ("summary.json", "model.safetensors", "adapter_model.safetensors"):
        (target / name).unlink(missing_ok=True)
