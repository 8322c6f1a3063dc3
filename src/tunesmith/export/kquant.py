"""K-quants (q4_k_m, q5_k_m, q6_k) through llama.cpp's own quantiser, from the f16 GGUF we write.

The `gguf` package has no k-quant encoder, and llama.cpp's quantiser is the reference
implementation every runtime reads, so tunesmith calls it (`llama_model_quantize` in
llama-cpp-python's bindings) rather than re-implementing it. K-quants store each weight row
in super-blocks of 256 values (QK_K); llama.cpp silently stores a matrix whose rows are not a
multiple of 256 in a 32-block type instead (Q5_0 for Q4_K, Q5_1 for Q5_K, Q8_0 for Q6_K, f16
when even 32 does not divide). tunesmith refuses a model where that would be every matrix and
says which matrices fell back otherwise, so "q4_k_m" never silently means something else.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError

# llama.h's llama_ftype values for the k-quant mixes we expose.
K_QUANTS = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
QK_K = 256  # values per k-quant super-block: a row must be a multiple of this
K_TYPES = {"Q4_K", "Q5_K", "Q6_K"}  # what the three mixes store when every row fits

BUILD_FLAGS = ("-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "
               "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF")
INSTALL = f'CMAKE_ARGS="{BUILD_FLAGS}" pip install "tunesmith[llama]"'


def how_to_get(quant: str, reason: str | None = None) -> UserError:
    """The error for a k-quant without usable llama.cpp bindings: the one command that gets them."""
    lines = [f"install llama-cpp-python (it builds llama.cpp from source, 15-30 min on 2 cores): {INSTALL}",
             "the AMX flags matter: on CPUs with AMX llama.cpp's default build segfaults on quantised models",
             (f"or export --quant f16 and run llama.cpp's `llama-quantize MODEL-f16.gguf MODEL-{quant}.gguf "
              f"{quant.upper()}`"),
             "or use --quant q8_0 (pure Python, about twice the size of q4_k_m, near-lossless)"]
    if reason:
        lines.insert(0, f"importing llama_cpp failed: {reason}")
    return UserError(f"{quant} needs llama.cpp's quantiser, which is not installed", lines)


def llama_bindings(quant: str) -> Any:
    """llama-cpp-python's module, or a UserError saying how to get it (also when its library fails to load)."""
    try:
        import llama_cpp
    except ModuleNotFoundError as exc:
        if exc.name == "llama_cpp":
            raise how_to_get(quant) from None
        raise how_to_get(quant, f"{exc} (llama-cpp-python is installed without its dependencies)") from None
    except (ImportError, OSError, RuntimeError) as exc:  # installed, but its shared library does not load
        raise how_to_get(quant, str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    return llama_cpp


def matrix_columns(model: Any) -> list[int]:
    """The row length (ggml's ne[0], torch's last dim) of every weight matrix the GGUF will hold."""
    return [t.shape[-1] for t in model.state_dict().values() if t.ndim == 2]


def check_shapes(model: Any, quant: str) -> None:
    """Refuse a k-quant when no matrix has rows that are a multiple of 256 (all would fall back)."""
    columns = matrix_columns(model)
    if columns and all(c % QK_K for c in columns):
        config = model.config
        raise UserError(
            f"{quant}: llama.cpp's k-quants store each weight row in blocks of {QK_K} values, and no weight "
            f"matrix of this model has rows that are a multiple of {QK_K} (row lengths: "
            f"{', '.join(map(str, sorted(set(columns))))}; hidden_size {getattr(config, 'hidden_size', '?')})",
            ["llama.cpp would store every matrix in a 32-block type (Q5_0/Q5_1/Q8_0) or f16 instead",
             "use --quant q8_0 (rows need a multiple of 32) or f16"])


def quantize(f16_path: Path, out_path: Path, quant: str) -> None:
    """Run llama.cpp's quantiser on an f16 GGUF, its log captured (reported only if it fails)."""
    llama_cpp = llama_bindings(quant)
    log: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level: int, text: bytes, user_data: Any) -> None:
        log.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = K_QUANTS[quant]
        status = llama_cpp.llama_model_quantize(str(f16_path).encode(), str(out_path).encode(),
                                                ctypes.byref(params))
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if status != 0:
        reason = next((line.strip() for line in log if "failed to quantize" in line), f"status {status}")
        raise UserError(f"llama.cpp's quantiser failed on {f16_path}: {reason}",
                        ["export --quant f16 and run llama.cpp's `llama-quantize` on it to see its full log"])


def fallback_note(path: Path, quant: str) -> str | None:
    """A line naming the matrices llama.cpp stored in another type than the k-quant (None if none)."""
    from gguf import GGUFReader

    matrices = [t for t in GGUFReader(str(path)).tensors if len(t.shape) == 2]
    fell = [t for t in matrices if t.tensor_type.name not in K_TYPES]
    if not fell:
        return None
    types = sorted({t.tensor_type.name for t in fell})
    columns = sorted({int(t.shape[0]) for t in fell})
    return (f"note: {len(fell)} of {len(matrices)} weight matrices are {'/'.join(types)}, not a k-quant: "
            f"llama.cpp's k-quants need rows that are a multiple of {QK_K} values, and theirs have "
            f"{', '.join(map(str, columns))}")
