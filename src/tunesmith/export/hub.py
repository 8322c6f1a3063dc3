"""`push_model(...)`: upload a tunesmith output (adapter, full model or merged) with its model card.

One commit through `huggingface_hub`: the weights, tokenizer (with the chat template),
generation config, the run's config/summary/report, any GGUF/Modelfile already exported,
and the generated README.md. Training leftovers (checkpoints, TensorBoard events, the
data cache) and the held-out data (eval.jsonl: it is the user's data) are not uploaded.

The token comes from the environment (HF_TOKEN) or the HF login and is passed straight to
`HfApi`; it is never printed or logged, and no error message we write contains it.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from tunesmith.errors import UserError
from tunesmith.export.card import model_card
from tunesmith.export.source import ExportSource, load_source

RUN_FILES = ("config.yaml", "summary.json", "report.md", "loss.png", "metrics.jsonl")
SKIP_DIRS = {"checkpoints", "tensorboard", ".cache", "merged"}
SKIP_FILES = {"eval.jsonl", "README.md", "report.html"}
LOGIN_HELP = ["log in with `hf auth login` (or `huggingface-cli login`), or set HF_TOKEN in the environment "
              "(a token with write access: https://huggingface.co/settings/tokens)"]


def hub_token() -> str:
    """The user's token (environment or login), or a UserError saying how to provide one."""
    from huggingface_hub import constants, get_token

    if constants.HF_HUB_OFFLINE:
        raise UserError("push needs the network, but HF_HUB_OFFLINE is set",
                        ["unset HF_HUB_OFFLINE (and TRANSFORMERS_OFFLINE) and try again when online"])
    token = get_token()
    if not token:
        raise UserError("push needs a Hugging Face token, and none was found", LOGIN_HELP)
    return token


def upload_files(source: ExportSource) -> dict[str, Path]:
    """repo path -> local file for everything of the output dir that belongs in the repo."""
    if source.path is None:
        raise UserError(f"{source.name}: push uploads a local model directory (a tunesmith output)")
    files: dict[str, Path] = {}
    for path in sorted(source.path.iterdir()):
        if path.is_file() and path.name not in SKIP_FILES:
            files[path.name] = path
        elif path.is_dir() and path.name.startswith("export-"):
            files.update({p.name: p for p in sorted(path.iterdir()) if p.suffix == ".gguf" or p.name == "Modelfile"})
    return files


def _exported(files: dict[str, Path]) -> list[str]:
    kinds = ["gguf"] if any(name.endswith(".gguf") for name in files) else []
    return kinds + (["ollama"] if "Modelfile" in files else [])


def _merged_files(source: ExportSource, staging: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Replace the adapter with merged full weights (written to `staging`); run files stay."""
    from tunesmith.export.merged import write_merged

    write_merged(source, staging)
    kept = {k: v for k, v in files.items() if k in RUN_FILES or k.endswith(".gguf") or k == "Modelfile"}
    return {**kept, **{p.name: p for p in sorted(staging.iterdir()) if p.is_file()}}


def push_model(model: str, repo: str, private: bool = False, merged: bool = False,
               source: ExportSource | None = None) -> str:
    """Create/update `repo` on the Hub with `model`'s files and a generated card; returns the repo URL."""
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    token = hub_token()  # before loading anything heavy
    source = source or load_source(model)
    if merged and not source.is_adapter:
        print("--merged: the model already holds full weights; uploading them as they are", file=sys.stderr)
    files = upload_files(source)
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="tunesmith-push-") as tmp:
        if merged and source.is_adapter:
            files = _merged_files(source, Path(tmp), files)
        card = model_card(source, repo, merged=merged and source.is_adapter, exported=_exported(files))
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)) for name, path in files.items()]
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode("utf-8")))
        try:
            url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            api.create_commit(repo, operations, commit_message="Upload model trained with tunesmith",
                              repo_type="model")
        except HfHubHTTPError as exc:
            raise _hub_error(repo, exc) from None
    return str(url)


def _hub_error(repo: str, exc: Any) -> UserError:
    """A clear line for the common refusals (the token is not in any of these messages)."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return UserError(f"the Hub refused the upload to {repo} (HTTP {status}): the token lacks write access "
                         "to this namespace", LOGIN_HELP)
    return UserError(f"the upload to {repo} failed (HTTP {status}): {str(exc).splitlines()[0]}")
