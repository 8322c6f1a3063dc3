"""Write a model as one GGUF file for llama.cpp, Ollama and LM Studio.

The file carries everything a runtime needs to behave like `tunesmith generate`: the
weights (laid out per `export.arch`), the tokenizer (`export.gguf_vocab`), the chat
template training used (`tokenizer.chat_template`), and the end-of-turn token as EOT next
to EOS, so chat mode renders and stops exactly where the model learned to.

f16, bf16 and q8_0 are written in pure Python by the `gguf` package (its quants module
implements Q8_0 and BF16 in numpy). K-quants (q4_k_m, q5_k_m, q6_k) need llama.cpp's own
quantiser: they are written as f16 first and then converted by `export.kquant` when the
`llama-cpp-python` package is installed.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from tunesmith.errors import UserError
from tunesmith.export.arch import (
    arch_spec,
    fix_tensor,
    llama3_rope_factors,
    write_hparams,
)
from tunesmith.export.gguf_vocab import write_vocab
from tunesmith.export.kquant import K_QUANTS, check_shapes, llama_bindings, quantize

QUANTS = ("f16", "bf16", "q8_0", *K_QUANTS)
Q8_BLOCK = 32  # Q8_0 quantises rows in blocks of 32 values (one f16 scale each)


def _file_type(quant: str) -> int:
    """The `general.file_type` llama.cpp reports (LlamaFileType)."""
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]


def encode_tensor(data: np.ndarray, quant: str) -> tuple[np.ndarray, Any]:
    """(bytes or array to store, its GGML type): 1-D tensors stay f32, as llama.cpp expects."""
    import gguf

    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim <= 1:
        return data, gguf.GGMLQuantizationType.F32
    if quant == "bf16":
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.BF16), gguf.GGMLQuantizationType.BF16
    if quant == "q8_0" and data.shape[-1] % Q8_BLOCK == 0:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return data.astype(np.float16), gguf.GGMLQuantizationType.F16  # f16, and q8_0 rows that do not split in 32s


def _tied(model: Any) -> bool:
    """Whether the output head shares the embedding matrix (then llama.cpp reuses token_embd)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and head.weight.data_ptr() == embed.weight.data_ptr()


def add_tensors(writer: Any, model: Any, spec: Any, quant: str) -> int:
    """Every weight under its llama.cpp name, fixed up and encoded; returns how many were written."""
    import gguf

    config = model.config
    names = gguf.get_tensor_name_map(_arch_enum(spec.gguf_arch), config.num_hidden_layers)
    tied, count = _tied(model), 0
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UserError(f"GGUF export: no llama.cpp name for tensor {hf_name!r} of this {config.model_type} model",
                            ["this checkpoint has a layout tunesmith does not convert; `--to merged` works"])
        data = fix_tensor(spec, hf_name, tensor.detach().float().cpu().numpy(), config)
        stored, kind = encode_tensor(data, quant)
        writer.add_tensor(gguf_name, stored, raw_dtype=kind)
        count += 1
    factors = llama3_rope_factors(config)
    if factors is not None:
        writer.add_tensor("rope_freqs.weight", factors, raw_dtype=gguf.GGMLQuantizationType.F32)
        count += 1
    return count


def _arch_enum(name: str) -> Any:
    """gguf.MODEL_ARCH member for an architecture name such as "llama"."""
    import gguf

    return next(arch for arch, arch_name in gguf.MODEL_ARCH_NAMES.items() if arch_name == name)


def write_gguf(model: Any, tokenizer: Any, path: Path, quant: str, end_of_turn_ids: list[int],
               name: str | None = None) -> Path:
    """Write `model` + `tokenizer` to `path` as GGUF in `quant` (f16 | bf16 | q8_0 | q4_k_m | q5_k_m | q6_k)."""
    if quant not in QUANTS:
        raise UserError(f"invalid value for quant: {quant!r} (allowed: {' | '.join(QUANTS)})")
    if quant in K_QUANTS:
        return _write_k_quant(model, tokenizer, path, quant, end_of_turn_ids, name)
    import gguf

    spec = arch_spec(model.config)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), spec.gguf_arch)
    writer.add_name(name or path.stem)
    writer.add_file_type(_file_type(quant))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rows = model.get_input_embeddings().weight.shape[0]
    write_hparams(writer, spec, model.config, rows)
    write_vocab(writer, tokenizer, rows, end_of_turn_ids)
    add_tensors(writer, model, spec, quant)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_k_quant(model: Any, tokenizer: Any, path: Path, quant: str, end_of_turn_ids: list[int],
                   name: str | None) -> Path:
    """f16 GGUF to a temporary file next to `path`, then llama.cpp's quantiser to `quant`."""
    arch_spec(model.config)
    check_shapes(model, quant)
    llama_bindings(quant)  # before the slow part
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".f16.gguf", dir=path.parent)
    os.close(fd)
    try:
        write_gguf(model, tokenizer, Path(tmp), "f16", end_of_turn_ids, name or path.stem)
        quantize(Path(tmp), path, quant)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path
