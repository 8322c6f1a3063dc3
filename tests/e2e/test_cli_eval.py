"""`tunesmith eval` as a subprocess: table on stdout, both reports written; bad input exits 2 with one clear line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def tunesmith(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the CLI offline on one thread (tiny models)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "tunesmith.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120, cwd=cwd)


def test_eval_compare_prints_table_and_writes_reports(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "qa.csv"
    data.write_text("question,answer\nhello there,HELLO\nwhat is the sun,A STAR\nsay yes,YES\n", encoding="utf-8")
    result = tunesmith("eval", str(tiny_model_dir), "--data", str(data), "--compare", str(tiny_model_dir),
                       "--max-new-tokens", "4", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0].split()
    assert header == ["metric", tiny_model_dir.name, tiny_model_dir.name, "change", "reference"]
    for label in ("loss on reply tokens", "exact match", "ROUGE-L F1", "chrF", "upper-case share of letters"):
        assert label in result.stdout
    assert "skipped label accuracy: the references are free text" in result.stdout
    assert (tmp_path / "report.html").is_file() and (tmp_path / "report.md").is_file()  # default: ./report.html
    assert "report: report.html" in result.stdout
    assert "HELLO" in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_eval_bad_input_exits_2_without_traceback(tiny_model_dir: Path, tmp_path: Path) -> None:
    result = tunesmith("eval", str(tiny_model_dir), "--max-new-tokens", "0")
    assert result.returncode == 2 and "max_new_tokens" in result.stderr and "Traceback" not in result.stderr
