"""Unsloth's SFT rows for bench/gpu_train.py, each run in a child process of its own.

Why a child process: importing unsloth patches transformers, TRL and peft process-wide (its
attention, RoPE and MLP kernels, the CausalLM forward, the trainer's source), so a Trainer or
TRL row run after it in the same process would no longer measure those libraries; and Unsloth
pins TRL <= 1.15 and datasets < 5, older than what the TRL rows run. The child puts Unsloth's own
site folder first on its path and runs the same samples (`synth_samples` is seeded), the same
random weights (`build_model` is seeded, saved to a temporary folder for Unsloth's loader) and
the same SFTTrainer measurement as the TRL rows (`gpu_train.run_trl`).

Unsloth as its docs recommend for speed: `FastLanguageModel.from_pretrained` in bf16
(`full_finetuning=True` for the full row), its LoRA (r=16, the 7 projections) for the LoRA row,
SFTTrainer with packing into rows of the same token budget, batch 1 row. Checkpointing is off
(`use_gradient_checkpointing=False`): the rows fit the GPU without it, and without it Unsloth is
fastest. QLoRA rows (bench/qlora.py, the 8B shape) load the model saved by the parent in 4 bits
(`load_in_4bit=True`, Unsloth's NF4) with the same LoRA, checkpointing as asked: "unsloth" (its
own offloaded checkpointing, what its QLoRA notebooks use) or off.

The GPU machine has no network: the site folder comes as `.unsloth/site.tar.xz` (bench/README.md,
"Unsloth on the GPU machine", says how it is built), unpacked to `.unsloth/site`, or wherever
`UNSLOTH_SITE` points. Without it the rows say they were skipped and why.

    python bench/unsloth_rows.py --shape llama-1b --regime short --samples 600 --method full --out row.json
    python bench/unsloth_rows.py --model SAVED_8B --samples 200 --method qlora --max-length 4096 --checkpointing unsloth
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SITE = Path(os.environ.get("UNSLOTH_SITE", HERE.parent / ".unsloth" / "site"))
CHILD_SECONDS = 420  # a row that has not ended by then is reported as cut short
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def row_name(method: str, checkpointing: str) -> str:
    """"Unsloth full", "Unsloth LoRA", "Unsloth QLoRA (checkpointing off)", ..."""
    name = f"Unsloth {dict(full='full', lora='LoRA', qlora='QLoRA')[method]}"
    return name + (f" (checkpointing {checkpointing})" if method == "qlora" else "")


def run_unsloth(shape: str, regime: str, n_samples: int, method: str, rate: float, max_length: int,
                model: Path | None = None, checkpointing: str = "off") -> Any:
    """One Unsloth row (a `gpu_train.Result`), measured in a child process; its error says why if none ran.

    `model`: a saved model to load (the QLoRA rows' 8B shape) instead of `shape`'s seeded random one.
    """
    import gpu_train as bench

    name = row_name(method, checkpointing)
    if not SITE.is_dir():
        return bench.Result(name, error=f"skipped: no Unsloth site folder at {SITE} (see bench/README.md)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        path = [str(SITE), str(HERE), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path),
               "UNSLOTH_DISABLE_STATISTICS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, str(Path(__file__)), "--shape", shape, "--regime", regime, "--samples",
                   str(n_samples), "--method", method, "--rate", str(rate), "--max-length", str(max_length),
                   "--checkpointing", checkpointing, "--out", str(out)] + (["--model", str(model)] if model else [])
        try:
            done = subprocess.run(command, env=env, cwd=tmp, capture_output=True, text=True, timeout=CHILD_SECONDS)
        except subprocess.TimeoutExpired:
            return bench.Result(name, error=f"cut short: no result within {CHILD_SECONDS} s")
        log = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        if not out.is_file():
            return bench.Result(name, error=f"child exited {done.returncode}: " + " | ".join(log[-3:])[-300:])
        row = bench.Result(**json.loads(out.read_text()))
    said = [line for line in log if (line.startswith("Unsloth") or "xformers" in line.lower()) and "/s]" not in line]
    row.notes += said[:8]  # (its banner and progress bars are left out)
    return row


def unsloth_model(path: str, method: str, max_length: int, checkpointing: str) -> Any:
    """Unsloth's loader (4-bit for QLoRA) and its LoRA on the random model saved at `path`."""
    import torch
    from unsloth import FastLanguageModel

    ckpt: Any = "unsloth" if checkpointing == "unsloth" else False
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=path, max_seq_length=max_length, dtype=torch.bfloat16, load_in_4bit=method == "qlora",
        full_finetuning=method == "full", use_gradient_checkpointing=ckpt)
    if method != "full":
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=PROJECTIONS, use_gradient_checkpointing=ckpt,
                                                 random_state=0)
    return model


def child(args: argparse.Namespace) -> None:
    """The row itself: Unsloth imported first (before transformers, TRL, peft), then measured as TRL's rows."""
    import unsloth  # noqa: F401  (first: it patches the libraries as they load)

    from dataclasses import asdict

    import torch

    import gpu_train as bench

    from transformers import AutoConfig, AutoTokenizer

    import qlora

    config = AutoConfig.from_pretrained(args.model) if args.model else bench.model_config(args.shape)
    samples = bench.synth_samples(args.samples, args.regime, config.vocab_size)
    name = row_name(args.method, args.checkpointing)
    torch.backends.cuda.matmul.allow_tf32 = True
    rate = args.rate or bench.matmul_tflops()
    with tempfile.TemporaryDirectory() as tmp:
        saved = args.model or tmp
        if not args.model:
            model = bench.build_model(config, torch.bfloat16)  # seeded: the weights every other row starts from
            model.save_pretrained(saved)
            del model
        if not (Path(saved) / "tokenizer_config.json").is_file():
            AutoTokenizer.from_pretrained(bench.STARTER).save_pretrained(saved)
        # its checkpointing is set on the model (Unsloth's own), so TRL's flag stays off
        row = bench.guarded(name, bench.run_trl, config, samples, args.method != "full", rate, args.max_length,
                            checkpointing=False, label=name,
                            make_model=lambda: unsloth_model(saved, args.method, args.max_length, args.checkpointing),
                            n_params=qlora.n_params(config) if args.method == "qlora" else None)
    from importlib.metadata import version

    row.notes.insert(0, ", ".join(f"{name} {version(name)}" for name in ("unsloth", "unsloth_zoo", "trl", "datasets",
                                                                      "bitsandbytes")))
    row.notes.insert(1, f"Unsloth's checkpointing: {args.checkpointing}")
    Path(args.out).write_text(json.dumps(asdict(row)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-1b")
    parser.add_argument("--regime", default="short")
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--method", choices=("full", "lora", "qlora"), default="full")
    parser.add_argument("--model", default="", help="a saved model to load instead of --shape's random one")
    parser.add_argument("--checkpointing", choices=("off", "unsloth"), default="off")
    parser.add_argument("--rate", type=float, default=0.0, help="the matmul rate (TFLOP/s); 0: measure it")
    parser.add_argument("--max-length", type=int, default=8192)
    parser.add_argument("--out", default="unsloth_row.json")
    child(parser.parse_args())


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
