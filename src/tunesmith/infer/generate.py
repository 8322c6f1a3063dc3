"""Text generation for any model tunesmith can load: batched, streamed, stopping at end-of-turn.

`model.generate` from transformers does the decoding loop (KV cache, left-padded
batches), or, for a local plain-Llama checkpoint loaded on CPU with `light=True` (the CLI, so
the starter answers without importing transformers' model code), `infer.llama`'s decoder with
the same arguments and results; the distribution is shaped only by our processors (`tunesmith.infer.sampling`),
and generation stops at every token that can end a turn. Prompts are rendered with the
model's own chat template (the one training saved), or used raw for base models that
have none.
"""
from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunesmith.errors import UserError
from tunesmith.infer.sampling import SamplingOptions, build_processors, sampling_with

Prompt = str | list[dict[str, str]]  # plain text, or a message list [{"role", "content"}]

# Turn-closing tokens of common chat formats; any that is a single token of the vocabulary stops generation.
KNOWN_END_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<|end_of_text|>", "<|endoftext|>", "<end_of_turn>")


@dataclass
class Completion:
    """One generated reply: the new text, its token ids, and whether it ended at an end-of-turn/EOS token."""

    text: str
    token_ids: list[int]
    stopped: bool  # False: it ran into max_new_tokens (or the context window)


def has_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template (instruct model) or not (base model: raw prompts)."""
    source = getattr(tokenizer, "chat_template", None)
    return isinstance(source, str) and bool(source.strip())


def stop_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every id that ends a reply: the generation config's EOS ids, the tokenizer's EOS, the template's
    end-of-turn token, and known turn-closing specials present in the vocabulary."""
    from tunesmith.data.templates import end_of_turn_ids

    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.extend(config_eos if isinstance(config_eos, list) else [config_eos] if config_eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    if has_template(tokenizer):
        ids.extend(end_of_turn_ids(tokenizer))
    vocab = tokenizer.get_vocab()
    ids.extend(vocab[t] for t in KNOWN_END_TOKENS if t in vocab)
    return sorted({int(i) for i in ids})


def prompt_ids(tokenizer: Any, prompt: Prompt, *, raw: bool = False, system: str | None = None) -> list[int]:
    """Token ids of one prompt: rendered with the chat template (plus the assistant header), or raw.

    Raw is automatic when the tokenizer has no template. A message list needs a template.
    """
    if isinstance(prompt, str) and (raw or not has_template(tokenizer)):
        if system:
            why = "with --raw" if raw else "with a base model (it has no chat template)"
            raise UserError(f"a system prompt needs the chat template, so it cannot be used {why}")
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if not has_template(tokenizer):
        raise UserError("this model has no chat template, so it cannot take a message list; pass plain text")
    from tunesmith.data.templates import Renderer

    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    text = Renderer(tokenizer).render(messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template writes BOS itself


def read_prompts(path: str) -> list[Prompt]:
    """Prompts of a `--prompts` file: .jsonl lines are a string, {"prompt": TEXT} or {"messages": [...]};
    any other file holds one plain-text prompt per non-empty line. Bad lines are all reported."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"{path}: no such file (expected a prompts file: .jsonl, or text with one prompt per line)")
    prompts: list[Prompt] = []
    problems: list[str] = []
    for number, line in enumerate(file.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            prompts.append(_prompt_record(json.loads(line)))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})")
        except TypeError as exc:
            problems.append(f"{path}:{number}: {exc}")
    if problems:
        if len(problems) == 1:
            raise UserError(problems[0])
        raise UserError(f"{path}: {len(problems)} bad lines", problems[:20])
    if not prompts:
        raise UserError(f"{path}: no prompts found (the file is empty)")
    return prompts


def _prompt_record(record: Any) -> Prompt:
    """One decoded JSONL record -> a prompt; TypeError names what was expected."""
    expected = 'expected a string, {"prompt": TEXT} or {"messages": [{"role", "content"}, ...]}'
    if isinstance(record, str) and record.strip():
        return record
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and record["prompt"].strip():
        return record["prompt"]
    messages = record.get("messages") if isinstance(record, dict) else None
    if isinstance(messages, list) and messages and all(
            isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
            and isinstance(m.get("content"), str) for m in messages):
        if messages[-1]["role"] != "user":
            raise TypeError("the messages must end with a user message (the one to reply to)")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise TypeError(f"{expected} (found {json.dumps(record)[:60]})")


# Below this size a CPU decoding step is too small for torch's thread pool to pay off: on the
# starter (14M parameters) one thread decoded 35-40 tokens/s and two threads 5 tokens/s on two
# shared cores, and the first forward alone spent ~1 s waking the pool.
ONE_THREAD_BELOW_PARAMETERS = 50_000_000


@contextlib.contextmanager
def decoding_threads(model: Any) -> Iterator[None]:
    """Decode a small model on CPU with one intra-op thread, restoring the caller's setting after.

    A step of a small model is a few microsecond-sized matmuls, so handing them to a thread
    pool costs more than it saves, and far more when the cores are shared with other work.
    """
    device = getattr(model, "device", None)
    small = sum(p.numel() for p in model.parameters()) < ONE_THREAD_BELOW_PARAMETERS
    if getattr(device, "type", None) != "cpu" or not small or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def context_window(model: Any) -> int | None:
    """The longest sequence the model was built for (None when its config does not say)."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token rows to one length: (input_ids, attention_mask), each (B, T)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row):] = 1
    return ids.to(device), mask.to(device)


def _generate_kwargs(model: Any, tokenizer: Any, rows: list[list[int]], sampling: SamplingOptions,
                     stop_ids: list[int]) -> dict[str, Any]:
    """Everything `model.generate` needs for one batch, with HF's own warpers switched off."""
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    input_ids, attention_mask = _left_pad(rows, pad_id, model.device)
    new_tokens = sampling.max_new_tokens
    window = context_window(model)
    if window is not None:
        if input_ids.shape[1] >= window:
            raise UserError(f"the prompt is {input_ids.shape[1]} tokens, longer than the model's context "
                            f"window of {window} tokens (shorten it)")
        new_tokens = min(new_tokens, window - input_ids.shape[1])
    # Neutral values, so a model's generation_config.json cannot add HF processors on top of ours.
    neutral: dict[str, Any] = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
    if not sampling.greedy:
        neutral.update(temperature=1.0, top_k=0, top_p=1.0, typical_p=1.0)
    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=not sampling.greedy, num_beams=1,
                              eos_token_id=stop_ids, pad_token_id=pad_id, **neutral)
    from transformers import LogitsProcessorList

    return {"input_ids": input_ids, "attention_mask": attention_mask, "generation_config": config,
            "logits_processor": LogitsProcessorList(build_processors(sampling, input_ids.shape[1]))}


def _completion(tokenizer: Any, new_ids: list[int], stop_ids: set[int]) -> Completion:
    """Cut a generated row at its first stop token (kept in token_ids) and decode the text before it."""
    for n, token in enumerate(new_ids):
        if token in stop_ids:
            kept = new_ids[: n + 1]
            return Completion(tokenizer.decode(kept, skip_special_tokens=True), kept, True)
    return Completion(tokenizer.decode(new_ids, skip_special_tokens=True), new_ids, False)


@torch.inference_mode()
def generate_batch(model: Any, tokenizer: Any, prompts: list[str] | list[list[dict[str, str]]],
                   sampling: SamplingOptions, *, raw: bool = False, system: str | None = None,
                   batch_size: int = 16) -> list[Completion]:
    """Generate one completion per prompt, in the prompts' order, batching similar lengths together.

    Prompts are sorted by length so a batch wastes little on left padding; `text` holds
    the new text only, special tokens removed.
    """
    stop_ids = stop_token_ids(model, tokenizer)
    if not stop_ids:
        raise UserError("this model has no EOS or end-of-turn token, so replies could never stop")
    rows = [prompt_ids(tokenizer, p, raw=raw, system=system) for p in prompts]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    results: dict[int, Completion] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        kwargs = _generate_kwargs(model, tokenizer, [rows[i] for i in chunk], sampling, stop_ids)
        with decoding_threads(model):
            out = model.generate(**kwargs)  # (B, T + new)
        new = out[:, kwargs["input_ids"].shape[1]:].tolist()
        for i, new_ids in zip(chunk, new):
            results[i] = _completion(tokenizer, new_ids, set(stop_ids))
    return [results[i] for i in range(len(rows))]


class _StopFlag:
    """A stopping criterion that ends generation when its event is set (Ctrl-C, or the reader left)."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def stream_text(model: Any, tokenizer: Any, prompt: Prompt, sampling: SamplingOptions, *,
                raw: bool = False, system: str | None = None) -> Iterator[str]:
    """Yield the reply's text piece by piece while it is generated (one prompt).

    Generation runs in a thread; leaving the loop early (break, Ctrl-C) stops it at the
    next token. Same seed and options give the same text as `generate_batch`.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    stop_ids = stop_token_ids(model, tokenizer)
    kwargs = _generate_kwargs(model, tokenizer, [prompt_ids(tokenizer, prompt, raw=raw, system=system)],
                              sampling, stop_ids)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    flag = _StopFlag()
    failure: list[BaseException] = []

    def work() -> None:
        try:
            with torch.inference_mode(), decoding_threads(model):
                model.generate(**kwargs, streamer=streamer, stopping_criteria=StoppingCriteriaList([flag]))
        except BaseException as exc:  # re-raised in the reader's thread below
            failure.append(exc)
            streamer.end()

    if sampling.seed is not None:
        torch.manual_seed(sampling.seed)
    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    try:
        yield from streamer
    finally:
        flag.event.set()
        thread.join()
    if failure:
        raise failure[0]


@dataclass
class Model:
    """A loaded model with its tokenizer, ready to generate (what `tunesmith.load` returns)."""

    model: Any
    tokenizer: Any
    name: str = ""
    sampling: SamplingOptions = field(default_factory=SamplingOptions)

    def generate(self, prompt: Prompt, *, raw: bool = False, system: str | None = None, **sampling: Any) -> str:
        """The reply to one prompt (text or messages); keyword sampling options override the defaults."""
        options = sampling_with(self.sampling, sampling)
        return generate_batch(self.model, self.tokenizer, [prompt], options, raw=raw, system=system)[0].text

    def stream(self, prompt: Prompt, *, raw: bool = False, system: str | None = None,
               **sampling: Any) -> Iterator[str]:
        """The reply to one prompt as an iterator of text pieces, yielded as they are generated."""
        options = sampling_with(self.sampling, sampling)
        return stream_text(self.model, self.tokenizer, prompt, options, raw=raw, system=system)


def load(model: str | None = None, *, device: str | None = None, light: bool = False) -> Model:
    """Load a hub id, local directory or tunesmith output directory (LoRA adapters merged in) for inference.

    `light=True` (the CLI's generate and chat) decodes a local plain-Llama checkpoint, such
    as the starter, on CPU with `infer.llama` instead of transformers' model class, which
    saves about 2 s of imports at startup; `.model` is then not a transformers model. On a
    GPU the import is a small part of the start, and transformers' benchmarked path is kept.
    """
    from tunesmith.model.load import load_model, load_tokenizer, pick_device_dtype, resolve_model_name

    dev, dtype = pick_device_dtype(device)
    tokenizer = load_tokenizer(model)
    network: Any = None
    if light and dev.type == "cpu":
        from tunesmith.infer.llama import load_plain_llama

        network = load_plain_llama(resolve_model_name(model), dev, dtype)  # None: not a plain Llama directory
    if network is None:
        network = load_model(model, device=dev, dtype=dtype, merge_adapter=True).eval()
    return Model(network, tokenizer, model or "starter")


def generate(model: str | Model, prompt: Prompt, **sampling: Any) -> str:
    """One-shot convenience: `tunesmith.generate("my-output", "Hello")` -> the reply text."""
    loaded = model if isinstance(model, Model) else load(model)
    return loaded.generate(prompt, **sampling)
