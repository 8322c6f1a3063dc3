"""Peak resident memory of one training step through tunesmith's own pieces (run as a subprocess).

Usage: python measure_step_memory.py MODEL_DIR METHOD TOKENS CHECKPOINTING(0|1)
Prints the peak RSS growth in bytes from before the model loads to after one optimizer step.
A fresh process, so the peak is this step's (glibc returns big tensors to the OS on free).
"""
import resource
import sys

import torch


def rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def step(model_dir: str, method: str, tokens: int, ckpt: bool) -> None:
    """Load, wrap, one forward/backward and optimizer step at `tokens` tokens, as `train` does on CPU."""
    from tunesmith.config import MethodOptions
    from tunesmith.data.packing import collate_packed
    from tunesmith.data.tokenize import TokenizedSample
    from tunesmith.methods import PARAMETER_SETS
    from tunesmith.model.fast import prepare_for_training
    from tunesmith.model.load import load_model
    from tunesmith.train.losses import sft_loss_sum
    from tunesmith.train.optim import make_optimizer

    params, cpu = PARAMETER_SETS[method], torch.device("cpu")
    ids = [[(7 * i + j) % 4000 for i in range(min(tokens, 1024))] for j in range(max(1, tokens // 1024))]
    batch = collate_packed([TokenizedSample(x, x) for x in ids])
    model = load_model(model_dir, device=cpu, dtype=torch.float32, **params.load_options(cpu, torch.float32))
    model = params.wrap(model, MethodOptions(method=method))
    model.train()  # as the loop does: checkpointing only acts in training mode
    prepare_for_training(model, device=cpu, batch_tokens=tokens, gradient_checkpointing=ckpt)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    sft_loss_sum(model, batch).total.backward()
    optimizer.step()


def main() -> None:
    import gc

    torch.set_num_threads(1)
    model_dir, method, tokens, ckpt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    step(model_dir, method, 64, ckpt)  # imports, lazy initialisation and thread pools, at a small peak
    gc.collect()
    base = rss()
    step(model_dir, method, tokens, ckpt)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)


if __name__ == "__main__":
    main()
