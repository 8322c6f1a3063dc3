"""Ollama export: the Go TEMPLATE derived from each chat template renders a 2-turn conversation to
exactly the jinja text (built-in templates, and real templates of released models in
tests/fixtures/export/), checked with our small evaluator and, where `go` is installed, with Go's
own text/template; the Modelfile carries stops, the system prompt and sampling defaults."""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tunesmith.data.templates import BUILTIN
from tunesmith.errors import UserError
from tunesmith.export.gorender import GoTemplateError, render_go, render_ollama
from tunesmith.export.gotemplate import go_template, turn_pieces

FIXTURES = Path(__file__).parent / "fixtures" / "export"
REAL = sorted(FIXTURES.glob("*.jinja"))
BOS, EOS = "<s>", "</s>"
SYSTEM = "You are a helpful assistant."
TWO_TURNS = [{"role": "user", "content": "What is the capital of France?"},
             {"role": "assistant", "content": "Paris."},
             {"role": "user", "content": "And of Italy?"}]
NO_SYSTEM = {"google-gemma-2-2b-it", "mistralai-Mistral-Nemo-Instruct-2407"}  # their templates refuse or move it


def jinja(source: str):
    """Render as transformers' apply_chat_template does (its jinja environment and globals)."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    compiled = _compile_jinja_template(source)
    return lambda messages, gen: compiled.render(messages=messages, add_generation_prompt=gen,
                                                 bos_token=BOS, eos_token=EOS)


# Gemma 3's layout (written here, shortened): the system prompt opens the first user turn.
GEMMA3_LAYOUT = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set first = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for m in loop_messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first if loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")


def templates() -> dict[str, str]:
    found = {f"builtin-{name}": src for name, (src, _) in BUILTIN.items()}
    found["layout-gemma3"] = GEMMA3_LAYOUT
    found.update({path.stem: path.read_text(encoding="utf-8") for path in REAL})
    return found


def conversations(name: str) -> list[tuple[str, list[dict[str, str]]]]:
    """(system, messages) cases: without and (where the template has one) with a system prompt."""
    cases = [("", TWO_TURNS)]
    if name not in NO_SYSTEM:
        cases.append((SYSTEM, [{"role": "system", "content": SYSTEM}, *TWO_TURNS]))
    return cases


def derived(source: str) -> str:
    return go_template(turn_pieces(jinja(source)), bos=BOS)


def test_there_are_at_least_five_real_templates():
    assert len(REAL) >= 5


@pytest.mark.parametrize("name", sorted(templates()))
def test_go_template_renders_like_jinja(name):
    source = templates()[name]
    go = derived(source)
    for system, messages in conversations(name):
        want = jinja(source)(messages, True).removeprefix(BOS)  # the runtime's tokenizer adds BOS
        assert render_ollama(go, system, messages) == want, name
        # a finished conversation too, up to a closing EOS some templates add at the very end (Phi-3)
        full = messages + [{"role": "assistant", "content": "Rome."}]
        text, want_full = render_ollama(go, system, full), jinja(source)(full, False).removeprefix(BOS)
        assert want_full in (text, text + EOS), name


@pytest.mark.skipif(shutil.which("go") is None, reason="Go is not installed: the check against Go's own "
                    "text/template is skipped (the evaluator in tunesmith.export.gorender still runs)")
def test_go_text_template_agrees(tmp_path):
    """The same templates through Go's text/template, as Ollama runs them."""
    cases, wants = [], []
    for name, source in sorted(templates().items()):
        go = derived(source)
        for system, messages in conversations(name):
            cases.append({"template": go, "system": system, "messages": messages})
            wants.append(render_ollama(go, system, messages))
    proc = subprocess.run(["go", "run", str(FIXTURES / "render_go_template.go")], input=json.dumps(cases),
                          capture_output=True, text=True, timeout=300, env={**os.environ, "GOCACHE": str(tmp_path / "gocache")})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == wants


def test_evaluator_semantics():
    data = {"System": "", "Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    src = ('{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
           '{{ if eq .Role "user" }}U{{ .Content }}{{ else if $last }}L{{ .Content }}{{ end }}{{ end }}'
           '{{ if .System }}S{{ else }}-{{ end }}  {{- " x " -}}  !')
    assert render_go(src, data) == "UaLb- x !"
    with pytest.raises(GoTemplateError):
        render_go("{{ printf \"%s\" .System }}", data)
    with pytest.raises(GoTemplateError):
        render_go("{{ if .System }}open", data)


def test_template_that_refuses_system_is_exported_without_one_and_refused_with_one(llama3_tokenizer):
    from tunesmith.export.ollama import ollama_template

    tok = copy.deepcopy(llama3_tokenizer)
    tok.chat_template = (FIXTURES / "google-gemma-2-2b-it.jinja").read_text(encoding="utf-8")
    assert "System" not in ollama_template(tok, None)
    with pytest.raises(UserError, match="system prompt"):
        ollama_template(tok, "Be brief.")


def test_template_with_position_dependent_text_is_refused():
    from tunesmith.export.gotemplate import NotDerivable

    numbered = "{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(NotDerivable, match="position"):
        turn_pieces(jinja(numbered))


def test_cli_export_ollama_writes_gguf_and_modelfile(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tunesmith.cli", "export", str(tiny_model_dir), "--to", "ollama",
                           "--output", str(tmp_path / "ollama")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    modelfile = (tmp_path / "ollama" / "Modelfile").read_text(encoding="utf-8")
    gguf_name = f"{tiny_model_dir.name.lower()}-q8_0.gguf"
    assert modelfile.startswith(f"FROM ./{gguf_name}\nTEMPLATE \"\"\"")
    assert (tmp_path / "ollama" / gguf_name).is_file()
    assert 'PARAMETER stop "<|eot_id|>"' in modelfile and "PARAMETER temperature 0.7" in modelfile
    assert "SYSTEM" not in modelfile  # this model was not trained with a system prompt
    assert f"ollama create {tiny_model_dir.name.lower()} -f Modelfile" in proc.stdout
    assert "Modelfile (" in proc.stdout and "export took" in proc.stdout


def test_gemma3_layout_folds_the_system_prompt_into_the_first_user_turn():
    pieces = turn_pieces(jinja(GEMMA3_LAYOUT))
    assert pieces.sys_pre is None and pieces.sys_sep == "\n\n"
