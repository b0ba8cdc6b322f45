"""Dependency boundaries, and the README's example runs as written (on a tiny model)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# crma.lab and every module of it, imported together: if none pulls in gradio, none of them does alone either.
LAB = ", ".join(["crma.lab", *(f"crma.lab.{p.stem}" for p in sorted((ROOT / "crma" / "lab").glob("[!_]*.py")))])


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("crma", ["gradio", "plotly", "datasets", "transformers"]),
        ("crma.ablation", ["gradio"]),
        (LAB, ["gradio", "crma.ui"]),  # the page's logic stays testable without gradio; only crma.ui (and app) use it
    ],
)
def test_import_boundaries(module: str, forbidden: list[str]) -> None:
    code = f"import sys, {module}; print(','.join(m for m in {forbidden!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"`import {module}` pulled in {out.stdout.strip()}"


def test_readme_example_runs(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    example = next(b for b in blocks if "crma.attach" in b)
    hub_line = 'model = AutoModelForCausalLM.from_pretrained("HuggingFaceTB/SmolLM2-135M-Instruct")'
    assert hub_line in example
    # Offline: the same code on a config-built tiny Llama, and a batch of token ids.
    code = example.replace(hub_line, "from conftest import make_tiny_llama\nmodel = make_tiny_llama()")
    setup = (
        "import torch\nbatch = {'input_ids': torch.randint(0, 259, (2, 16))}\nbatch['labels'] = batch['input_ids']\n"
    )
    code = setup + code
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README, run as a test
    assert namespace["loss"].item() > 0
    assert (Path(namespace["out"]) / "crma.safetensors").exists()
