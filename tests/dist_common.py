"""What tests/test_distributed.py and its torchrun worker share: the run options and scenarios."""
from __future__ import annotations

import shutil
from pathlib import Path

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


def interrupted_copy(source: Path, target: Path) -> None:
    """`source` as it was when stopped right after its step-3 checkpoint (later checkpoint and results gone)."""
    shutil.copytree(source, target)
    shutil.rmtree(target / "checkpoints" / "step-000006")
    for name in ("summary.json", "model.safetensors", "adapter_model.safetensors"):
        (target / name).unlink(missing_ok=True)
