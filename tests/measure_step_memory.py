"""Peak resident memory of one training step through tunesmith's own pieces (run as a subprocess).

Usage: python measure_step_memory.py MODEL_DIR METHOD TOKENS CHECKPOINTING(0|1) [CONFIG_JSON]
(with CONFIG_JSON, a random Llama of that config is first saved to MODEL_DIR, in this process)
Prints the peak RSS growth in bytes from before the model loads to after one optimizer step.
A fresh process, so the peak is this step's (glibc returns big tensors to the OS on free).
"""
import resource
import sys

import torch


def status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes (VmRSS now, VmHWM its peak)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def rss() -> int:
    return status("VmRSS")


def reset_peak() -> bool:
    """Restart the peak (VmHWM) from the current RSS, so only what follows counts (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def step(model_dir: str, method: str, tokens: int, ckpt: bool) -> bool:
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
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(lm, "is_gradient_checkpointing", False))


def main() -> None:
    import gc

    torch.set_num_threads(1)
    model_dir, method, tokens, ckpt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "1"
    if len(sys.argv) > 5:
        import json

        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig.from_dict(json.loads(sys.argv[5]))).save_pretrained(model_dir)
    step(model_dir, method, 64, ckpt)  # imports, lazy initialisation and thread pools, at a small peak
    gc.collect()
    base = rss()
    fresh = reset_peak()  # else the lifetime peak, which an earlier phase may have set
    on = step(model_dir, method, tokens, ckpt)
    peak = status("VmHWM") if fresh else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"checkpointing={on} peak_reset={fresh} threads={torch.get_num_threads()}", file=sys.stderr)
    print(peak - base)


if __name__ == "__main__":
    main()
