"""Chat templates: use the tokenizer's own, or install a built-in one on the tokenizer.

The template used for training is always *set on the tokenizer* (`tokenizer.chat_template`),
so `tokenizer.save_pretrained(output)` saves it and inference renders byte-for-byte the
same way as training did. Built-ins never add tokens to the vocabulary: a template whose
special tokens the tokenizer lacks is refused (resizing embeddings silently would train
new, random rows).
"""
from __future__ import annotations

import functools
from typing import Any

from tunesmith.errors import UserError

# Each built-in: (jinja source, special tokens it needs as single tokens).
_SYSTEM_USER_ASSISTANT = "{%- for m in messages %}"
BUILTIN: dict[str, tuple[str, tuple[str, ...]]] = {
    "llama3": (
        "{{- bos_token if bos_token else '' }}" + _SYSTEM_USER_ASSISTANT
        + "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "chatml": (
        _SYSTEM_USER_ASSISTANT
        + "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
        ("<|im_start|>", "<|im_end|>"),
    ),
    "zephyr": (
        "{{- bos_token if bos_token else '' }}" + _SYSTEM_USER_ASSISTANT
        + "{{- '<|' + m['role'] + '|>\\n' + m['content'] + eos_token + '\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}",
        (),
    ),
    "alpaca": (
        "{{- bos_token if bos_token else '' }}" + _SYSTEM_USER_ASSISTANT
        + "{%- if m['role'] == 'system' %}{{- m['content'] + '\\n\\n' }}"
        "{%- elif m['role'] == 'user' %}{{- '### Instruction:\\n' + m['content'] + '\\n\\n' }}"
        "{%- else %}{{- '### Response:\\n' + m['content'] + eos_token + '\\n\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '### Response:\\n' }}{%- endif %}",
        (),
    ),
    "plain": (
        "{{- bos_token if bos_token else '' }}" + _SYSTEM_USER_ASSISTANT
        + "{%- if m['role'] == 'system' %}{{- m['content'] + '\\n\\n' }}"
        "{%- elif m['role'] == 'user' %}{{- 'User: ' + m['content'] + '\\n' }}"
        "{%- else %}{{- 'Assistant: ' + m['content'] + eos_token + '\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- 'Assistant:' }}{%- endif %}",
        (),
    ),
}
TEMPLATE_NAMES = ("auto", "tokenizer", *BUILTIN)


def choose_template(tokenizer: Any, name: str = "auto") -> str:
    """Decide the chat template, install it on `tokenizer`, and return the name used.

    "auto": the tokenizer's own template if it has one ("tokenizer"); else llama3 or
    chatml when the vocabulary has their special tokens; else zephyr, which needs no new
    tokens and ends each turn with the tokenizer's EOS.
    """
    if name not in TEMPLATE_NAMES:
        raise UserError(f"invalid value for template: {name!r} (allowed: {' | '.join(TEMPLATE_NAMES)})")
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: chat uses "default"
        own = tokenizer.chat_template = own.get("default")
    if name in ("auto", "tokenizer") and isinstance(own, str) and own.strip():
        return "tokenizer"
    if name == "tokenizer":
        raise UserError("template 'tokenizer': this tokenizer has no chat template of its own "
                        f"(choose one of: {', '.join(BUILTIN)})")
    if name == "auto":
        name = next((n for n in ("llama3", "chatml") if not _missing_tokens(tokenizer, n)), "zephyr")
    missing = _missing_tokens(tokenizer, name)
    if missing:
        raise UserError(
            f"template {name!r} needs the tokens {', '.join(missing)}, which this tokenizer's vocabulary lacks",
            ["choose a template that needs no new tokens: --template zephyr | alpaca | plain"],
        )
    if tokenizer.eos_token is None:
        raise UserError(f"template {name!r}: the tokenizer has no eos_token, so turns cannot end "
                        "(pick a model whose tokenizer defines one)")
    _register_specials(tokenizer, BUILTIN[name][1])
    tokenizer.chat_template = BUILTIN[name][0]
    return name


def _missing_tokens(tokenizer: Any, name: str) -> list[str]:
    """The special tokens of built-in `name` that are not single tokens in the vocabulary."""
    vocab = tokenizer.get_vocab()
    return [t for t in BUILTIN[name][1] if t not in vocab]


def _register_specials(tokenizer: Any, tokens: tuple[str, ...]) -> None:
    """Mark vocabulary entries as special so text never splits them (the vocab does not grow)."""
    known = {str(t) for t in tokenizer.added_tokens_decoder.values()}
    todo = [t for t in tokens if t not in known]
    if todo:
        before = len(tokenizer)
        tokenizer.add_special_tokens({"extra_special_tokens": todo}, replace_extra_special_tokens=False)
        assert len(tokenizer) == before, "registering existing tokens must not grow the vocabulary"


def template_kwargs(tokenizer: Any) -> dict[str, Any]:
    """The variables HF passes to a chat template besides messages: the special-token strings."""
    kwargs: dict[str, Any] = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
    kwargs.setdefault("bos_token", None)
    kwargs.setdefault("eos_token", None)
    return kwargs


@functools.lru_cache(maxsize=16)
def _compiled(source: str) -> Any:
    """The compiled jinja template, with HF's filters and globals (cached per source); None if unavailable."""
    try:  # a private helper of transformers: ~5x faster than apply_chat_template, which copies and checks
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    return _compile_jinja_template(source)


class Renderer:
    """Renders message lists with a tokenizer's template, fast (no tokenizing, no copying)."""

    def __init__(self, tokenizer: Any) -> None:
        source = getattr(tokenizer, "chat_template", None)
        if not isinstance(source, str) or not source.strip():
            raise UserError("the tokenizer has no chat template; call choose_template first")
        self.tokenizer = tokenizer
        self.source = source
        self.template = _compiled(source)
        self.kwargs = template_kwargs(tokenizer)

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               tools: list[dict[str, Any]] | None = None) -> str:
        """The template's text for `messages` (what apply_chat_template(tokenize=False) returns)."""
        try:
            if self.template is None:
                return self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                                          add_generation_prompt=add_generation_prompt)
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=tools, documents=None, **self.kwargs)
        except Exception as exc:  # jinja's raise_exception and template bugs
            raise UserError(f"the chat template failed to render a conversation: {exc}",
                            ["try another template with --template (see tunesmith data inspect)"]) from None

    @functools.cached_property
    def system_role(self) -> str | None:
        """None when the template shows the model a system prompt; else why not ("raises: ...", "drops it").

        Probed once, on an inference prompt: a template without a system role either raises on
        one (Gemma 2, Mistral 7B) or silently leaves it out; both mean the system prompt must be
        folded or refused. (Mistral-Nemo shows it only in the last user turn: that counts as a role.)
        """
        marker = "SYSTEMPROBE"
        probe = [{"role": "system", "content": marker}, {"role": "user", "content": "Hi"}]
        try:
            text = self.render(probe, add_generation_prompt=True)
        except UserError as exc:
            try:
                self.render(probe[1:], add_generation_prompt=True)
            except UserError:
                return None  # the template fails on the probe itself: nothing to learn about system roles
            return f"raises {str(exc).split(': ', 1)[-1]!r}"
        return None if marker in text else "leaves it out"

    @functools.cached_property
    def renders_tools(self) -> bool:
        """Whether the template renders assistant tool calls at all (it mentions `tool_calls`)."""
        return "tool_calls" in self.source


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Every token id that ends an assistant turn: the template's turn-closing token, and EOS.

    Found by rendering a probe conversation and taking the first special token after the
    assistant's text (Phi-3.5 `<|end|>`, Gemma `<end_of_turn>`, Llama 3 `<|eot_id|>`), plus
    Llama 3's `<|eom_id|>` (the end of a message awaiting a tool's result) where the vocabulary has it.
    Generation stops at any of these; training saves them as the generation config's `eos_token_id`.
    """
    ids: list[int] = []
    source = getattr(tokenizer, "chat_template", None)
    if isinstance(source, str) and source.strip():
        first = _first_special_after_reply(tokenizer, Renderer(tokenizer))
        if first is not None:
            ids.append(first)
        for token in EXTRA_END_OF_TURN:
            token_id = _token_id(tokenizer, token)
            if token_id is not None and token_id not in ids:
                ids.append(token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(int(tokenizer.eos_token_id))
    return ids


EXTRA_END_OF_TURN = ("<|eom_id|>",)  # ends a message that awaits a tool's result, not the turn's usual token


def _token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` if the vocabulary has it as one token, else None (a lookup, not a copy of
    the vocabulary: `get_vocab()` builds a dict of every entry, 0.1-0.2 s on a 128k-256k vocabulary)."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(token_id)


def _first_special_after_reply(tokenizer: Any, renderer: Renderer) -> int | None:
    """The first special token the template writes after an assistant reply (None if none)."""
    probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "PROBE"}]
    try:
        text = renderer.render(probe)
    except UserError:
        return None
    tail = text[text.rfind("PROBE") + len("PROBE"):]
    specials = {int(i) for i in tokenizer.added_tokens_decoder}
    return next((i for i in tokenizer.encode(tail, add_special_tokens=False) if i in specials), None)
