"""Build the bundled starter model: corpus -> tokenizer -> pretraining -> instruction tuning.

Two steps, both seeded:

    python3 scripts/build_starter.py prepare    # CPU, needs apt-get (network) the first time
    python3 scripts/build_starter.py train --out DIR   # one GPU, no network, ~8 minutes

`prepare` downloads three Debian packages (scripts/starter_corpus.py), extracts English
text, generates instruction conversations (scripts/starter_instructions.py), trains an 8k
byte-level BPE tokenizer with Llama-3-style special tokens and writes token arrays to
`.starter_build/` (git-ignored, ~30 MB, carried to the GPU machine). `train` pretrains a
small Llama on the text, instruction-tunes it on the conversations (loss on assistant
tokens only), and writes a complete HF model directory (bf16 safetensors + tokenizer).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / ".starter_build"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|finetune_right_pad_id|>"]
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
MODEL = dict(vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=7,
             num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=1024,
             rope_theta=10000.0, tie_word_embeddings=True, rms_norm_eps=1e-5)
SEQ = 512
DEVICE = "cuda"  # "cpu" only for a smoke test of the script (--cpu)


# ---------------------------------------------------------------- prepare (CPU)

def render(turns: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The chat template by hand: text plus the char spans of assistant content + <|eot_id|>."""
    text, spans = "<|begin_of_text|>", []
    for t in turns:
        text += f"<|start_header_id|>{t['role']}<|end_header_id|>\n\n"
        start = len(text)
        text += t["content"].strip() + "<|eot_id|>"
        if t["role"] == "assistant":
            spans.append((start, len(text)))
    return text, spans


def train_tokenizer(texts: list[str], out: Path) -> object:
    """An 8192-token byte-level BPE with Llama-3-style specials, saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=MODEL["vocab_size"], special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                 pad_token="<|finetune_right_pad_id|>", chat_template=CHAT_TEMPLATE,
                                 model_max_length=MODEL["max_position_embeddings"])
    hf.save_pretrained(out)
    return hf


def tokenize_sft(tok: object, convs: list[list[dict[str, str]]]) -> dict[str, np.ndarray]:
    """Flat ids, a 0/1 train mask per token and sample offsets for all conversations."""
    rendered = [render(c) for c in convs]
    encs = tok._tokenizer.encode_batch([r[0] for r in rendered], add_special_tokens=False)
    ids, mask, offsets = [], [], [0]
    for (text, spans), enc in zip(rendered, encs):
        m = [int(any(a <= s < b for a, b in spans)) for s, _ in enc.offsets]
        ids += enc.ids
        mask += m
        offsets.append(len(ids))
    return {"ids": np.array(ids, np.uint16), "mask": np.array(mask, np.uint8), "offsets": np.array(offsets, np.int64)}


def prepare(args: argparse.Namespace) -> None:
    """Download the packages, build text + conversations, train the tokenizer, tokenize."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import starter_corpus as sc
    import starter_instructions as si

    debs = BUILD / "debs"
    root = debs / "root" if (debs / "root").is_dir() else sc.download(debs)
    rng = random.Random(args.seed)
    corpus = sc.build_corpus(root)
    docs = [p for paras in corpus.values() for p in paras]
    # A few paragraphs in capitals: the tokenizer learns upper-case merges and the model sees
    # that register (headings, shouting), so an all-caps fine-tune has something to build on.
    shouted = [d.upper() for d in rng.sample(docs, len(docs) // 30)]
    docs += shouted
    rng.shuffle(docs)
    convs = si.generate(sc.read_wordnet(root), args.conversations, args.seed)
    tok = train_tokenizer(docs + shouted + [render(c)[0] for c in convs[:50_000]], BUILD / "tokenizer")
    text, _ = render(convs[0])
    assert tok.apply_chat_template(convs[0], tokenize=False) == text, "template and render() disagree"
    encs = tok._tokenizer.encode_batch(docs, add_special_tokens=False)
    bos, eos = tok.convert_tokens_to_ids(["<|begin_of_text|>", "<|end_of_text|>"])
    stream = np.array([t for e in encs for t in (bos, *e.ids, eos)], np.uint16)
    sft = tokenize_sft(tok, convs)
    np.savez_compressed(BUILD / "data.npz", pretrain=stream, sft_ids=sft["ids"], sft_mask=sft["mask"],
                        sft_offsets=sft["offsets"])
    stats = {"packages": sc.package_versions(debs), "paragraphs": {k: len(v) for k, v in corpus.items()},
             "chars": {k: sum(map(len, v)) for k, v in corpus.items()}, "pretrain_tokens": int(stream.size),
             "conversations": len(convs), "sft_tokens": int(sft["ids"].size),
             "sft_trained_tokens": int(sft["mask"].sum()), "seed": args.seed}
    (BUILD / "prepare_stats.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats, indent=1))


# ---------------------------------------------------------------- train (GPU)

def pretrain_batches(stream: np.ndarray, batch: int, rng: np.random.Generator):
    """Endless random windows of SEQ+1 tokens: (input_ids, labels) each (B, SEQ)."""
    import torch
    while True:
        starts = rng.integers(0, stream.size - SEQ - 1, size=batch)
        window = torch.from_numpy(np.stack([stream[s:s + SEQ].astype(np.int64) for s in starts]))  # (B, SEQ)
        yield window, window.clone(), None


def sft_batches(ids: np.ndarray, mask: np.ndarray, offsets: np.ndarray, batch: int, rng: np.random.Generator):
    """Endless packed rows: samples laid end to end, positions restarting per sample, -100 off-target."""
    import torch
    n = offsets.size - 1
    order, k = rng.permutation(n), 0
    while True:
        x = np.zeros((batch, SEQ), np.int64)
        y = np.full((batch, SEQ), -100, np.int64)
        pos = np.zeros((batch, SEQ), np.int64)
        for r in range(batch):
            fill = 0
            while True:
                i = order[k % n]
                a, b = offsets[i], min(offsets[i + 1], offsets[i] + SEQ)
                if fill + (b - a) > SEQ:
                    break
                x[r, fill:fill + b - a] = ids[a:b]
                y[r, fill:fill + b - a] = np.where(mask[a:b] == 1, ids[a:b].astype(np.int64), -100)
                pos[r, fill:fill + b - a] = np.arange(b - a)
                fill += b - a
                k += 1
                if k % n == 0:
                    order = rng.permutation(n)
            pos[r, fill:] = np.arange(SEQ - fill)  # padding: its own "sample", never trained
        yield torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(pos)


def run_phase(model, batches, steps: int, lr: float, warmup: int, name: str, budget_s: float,
              validate=None, every: int = 250) -> dict:
    """One optimisation phase (AdamW, linear warmup, cosine to 10%), stopping early past `budget_s`.

    With `validate` (a no-argument function returning a held-out loss), the weights with the
    lowest held-out loss seen every `every` steps are restored at the end: the corpus is small
    and many epochs over it memorise instead of generalise.
    """
    import torch
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    t0, seen, losses, best = time.time(), 0, [], (float("inf"), -1, None)
    for step in range(steps):
        scale = (step + 1) / warmup if step < warmup else 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        x, y, pos = (t.to(DEVICE, non_blocking=True) if t is not None else None for t in next(batches))
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            out = model(input_ids=x, labels=y, position_ids=pos, use_cache=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        seen += x.numel()
        last = step == steps - 1 or time.time() - t0 > budget_s
        if step % 100 == 0 or last:
            losses.append(out.loss.item())
            print(f"{name} step {step}/{steps} loss {losses[-1]:.3f} {seen / (time.time() - t0):,.0f} tok/s", flush=True)
        if validate is not None and ((step + 1) % every == 0 or last):
            val = validate()
            print(f"{name} step {step + 1} held-out loss {val:.3f}", flush=True)
            if val < best[0]:
                best = (val, step + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if last:
            steps = step + 1
            break
    result = {"steps": steps, "tokens": seen, "seconds": round(time.time() - t0, 1), "last_loss": losses[-1]}
    if best[2] is not None:
        model.load_state_dict(best[2])
        result.update(best_val_loss=best[0], best_step=best[1])
    return result


def eval_loss(model, batches, n: int = 20) -> float:
    """Mean loss over `n` held-out batches."""
    import torch
    model.eval()
    total = 0.0
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        for _ in range(n):
            x, y, pos = (t.to(DEVICE) if t is not None else None for t in next(batches))
            total += model(input_ids=x, labels=y, position_ids=pos, use_cache=False).loss.item()
    model.train()
    return total / n


def new_model(seed: int, **overrides: int):
    """A freshly initialised Llama with the starter's shape (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(**{**MODEL, **overrides}, bos_token_id=0, eos_token_id=4, pad_token_id=5,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to(DEVICE)


def calibrate_steps(data: np.ndarray, batch: int, budget_s: float, seed: int, overrides: dict) -> int:
    """How many pretraining steps fit in `budget_s` on this GPU (timed on a throwaway model)."""
    model = new_model(seed, **overrides)
    gen = pretrain_batches(data, batch, np.random.default_rng(seed))
    run_phase(model, gen, 5, 1e-4, 1, "warmup", 1e9)
    t = time.time()
    run_phase(model, gen, 20, 1e-4, 1, "calibrate", 1e9)  # .item() in the log line syncs the device
    return int(budget_s / ((time.time() - t) / 20))


def sample_replies(model, tok_dir: Path, prompts: list[str]) -> list[str]:
    """Greedy replies to a few instructions, for the build log."""
    import torch
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tok_dir)
    model.eval()
    out = []
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"].to(DEVICE)
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=[4, 1], pad_token_id=5)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        print(f"  {p!r} -> {out[-1]!r}", flush=True)
    return out


def train(args: argparse.Namespace) -> None:
    """Pretrain, instruction-tune, save a bf16 HF model directory with the tokenizer."""
    import torch
    from transformers import GenerationConfig
    global DEVICE
    DEVICE = "cpu" if args.cpu else "cuda"
    t_start = time.time()
    torch.backends.cuda.matmul.allow_tf32 = True
    overrides = json.loads(args.model_overrides)
    d = np.load(BUILD / "data.npz")
    stream, ids, mask, offsets = d["pretrain"], d["sft_ids"], d["sft_mask"], d["sft_offsets"]
    cut = int(stream.size * 0.99)
    n_val = 1000
    steps = args.pretrain_steps or calibrate_steps(stream[:cut], args.batch, args.pretrain_seconds, args.seed, overrides)
    print(f"pretrain steps: {steps}", flush=True)
    rng = np.random.default_rng(args.seed)
    model = new_model(args.seed, **overrides)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}", flush=True)
    pre_val = lambda: eval_loss(model, pretrain_batches(stream[cut:], args.batch, np.random.default_rng(0)), 8)
    pre = run_phase(model, pretrain_batches(stream[:cut], args.batch, rng), steps, args.lr, 200, "pretrain",
                    args.pretrain_seconds * 1.1, pre_val, 250)
    print(f"pretrain: {pre}", flush=True)
    sft_train = (ids, mask, offsets[:-n_val])
    sft_val = (ids, mask, offsets[-n_val - 1:])
    sft_v = lambda: eval_loss(model, sft_batches(*sft_val, args.batch // 2, np.random.default_rng(0)), 5)
    sft = run_phase(model, sft_batches(*sft_train, args.batch // 2, rng), args.sft_steps, args.sft_lr, 50, "sft",
                    args.sft_seconds, sft_v, 200)
    pre["val_loss_after_sft"] = eval_loss(model, pretrain_batches(stream[cut:], args.batch, np.random.default_rng(0)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = sample_replies(model, BUILD / "tokenizer", ["Define dog.", "What is 7 plus 5?", "Hello!",
                                                          "Give me a synonym for happy.", "What is the opposite of hot?"])
    model.to(torch.bfloat16).save_pretrained(out)
    GenerationConfig(bos_token_id=0, eos_token_id=[4, 1], pad_token_id=5, do_sample=True, temperature=0.6,
                     top_p=0.9, repetition_penalty=1.1, max_new_tokens=128).save_pretrained(out)
    for f in (BUILD / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    log = {"parameters": n_params, "model": {**MODEL, **overrides}, "seq_len": SEQ, "batch": args.batch,
           "pretrain": pre, "sft": sft, "samples": samples, "seconds_total": round(time.time() - t_start, 1),
           "device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "seed": args.seed}
    (out / "build_log.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log, indent=1))


def main() -> None:
    """Parse the subcommand and run it."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare")
    pp.add_argument("--seed", type=int, default=1234)
    pp.add_argument("--conversations", type=int, default=400_000)
    pt = sub.add_parser("train")
    pt.add_argument("--out", required=True)
    pt.add_argument("--seed", type=int, default=1234)
    pt.add_argument("--batch", type=int, default=128, help="rows of 512 tokens per pretraining step")
    pt.add_argument("--lr", type=float, default=2e-3)
    pt.add_argument("--pretrain-steps", type=int, default=0, help="0: as many as fit in --pretrain-seconds")
    pt.add_argument("--pretrain-seconds", type=float, default=300)
    pt.add_argument("--sft-steps", type=int, default=1500)
    pt.add_argument("--sft-lr", type=float, default=5e-4)
    pt.add_argument("--sft-seconds", type=float, default=100)
    pt.add_argument("--cpu", action="store_true", help="smoke test on CPU")
    pt.add_argument("--model-overrides", default="{}", help="JSON, e.g. for a smoke test")
    args = p.parse_args()
    {"prepare": prepare, "train": train}[args.cmd](args)


if __name__ == "__main__":
    main()
