"""Every code block of the README and the docs that claims to run is run by a test.

A ```python block is either a *fragment* (its first line says `# fragment: not runnable on its own (...)`), one
of the launched scripts that tests/test_example_readme.py runs on 2 ranks, or a single-process program that
this file runs as printed. Also: the README stays short, and `{{ version }}` pages show the package's version.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LAUNCHED = {"# train.py:": "README.md", "# train_ddp.py:": "docs/integrations.md"}  # test_example_readme.py


def _blocks() -> list[tuple[str, int, str]]:
    out = []
    for page in PAGES:
        text = page.read_text()
        for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
            out.append((str(page.relative_to(ROOT)), text[: m.start()].count("\n") + 1, m.group(1)))
    return out


def _runnable() -> list[tuple[str, int, str]]:
    return [b for b in _blocks() if not b[2].startswith("# fragment: not runnable")
            and not any(b[2].startswith(first) for first in LAUNCHED)]


def test_every_python_block_is_a_marked_fragment_a_launched_script_or_run_here():
    blocks = _blocks()
    assert len(blocks) >= 10
    for first, page in LAUNCHED.items():
        found = [b[0] for b in blocks if b[2].startswith(first)]
        assert found == [page], (first, found)
    assert _runnable(), "the getting-started example runs here"


@pytest.mark.parametrize("page,line,code", _runnable(), ids=[f"{p}:{n}" for p, n, _ in _runnable()])
def test_a_single_process_block_runs_as_printed(tmp_path, page, line, code):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
               OMP_NUM_THREADS="1")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{page}:{line}\n{r.stdout}\n{r.stderr}"


def test_the_readme_fits_in_300_lines_and_points_to_the_docs():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    for page in ("getting-started", "concepts", "distributed", "sharded-tables", "checkpoints", "export",
                 "integrations", "porting", "benchmarks", "cost-model", "limitations", "api", "cli"):
        assert f"(docs/{page}.md" in text


def test_relative_links_of_the_readme_point_to_files_that_exist():
    text = (ROOT / "README.md").read_text()
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", text):
        assert (ROOT / target).exists(), target


def test_the_docs_site_shows_the_version_and_excludes_the_drafts():
    config = (ROOT / "mkdocs.yml").read_text()
    assert "_drafts/" in config.split("exclude_docs:")[1].split("\n\n")[0]
    assert "{{ version }}" in (ROOT / "docs" / "index.md").read_text()
    sys.path.insert(0, str(ROOT / "docs" / "_hooks"))
    try:
        import version as hook
    finally:
        sys.path.pop(0)
    from importlib.metadata import version
    assert hook.on_page_markdown("distsparse **{{ version }}**") == f"distsparse **{version('distsparse')}**"


def test_the_command_line_page_shows_what_inspect_prints_for_the_getting_started_checkpoint(tmp_path):
    example = next(code for page, _, code in _runnable() if page == "docs/getting-started.md")
    shown = re.search(r"```text\n\$ distsparse inspect sparsity.safetensors\n(.*?)```",
                      (ROOT / "docs" / "cli.md").read_text(), flags=re.S).group(1)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    subprocess.run([sys.executable, "-c", example], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=300)
    r = subprocess.run([sys.executable, "-m", "distsparse", "inspect", "sparsity.safetensors"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout == shown, (r.stdout, shown)
