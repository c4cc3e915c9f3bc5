"""Every ```python block of README.md and docs/*.md runs as pasted.

Each block runs in a fresh namespace with a temporary directory as the working directory, and must finish within
SNIPPET_LIMIT_S. A block that cannot run on its own (a fragment that needs a model or data it does not define) is
marked on the line before its fence with

    <!-- snippet: skip (why) -->

and is reported as skipped with that reason; an unmarked block that raises fails the test. Keep fragments rare:
a 2-layer MLP and a few random samples make most examples self-contained.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_SKIP = re.compile(r"^\s*<!--\s*snippet:\s*skip\s*\((?P<why>[^)]*)\)\s*-->\s*$")


class Block:
    def __init__(self, path: Path, line: int, lang: str, code: str, skip: str | None):
        self.path, self.line, self.lang, self.code, self.skip = path, line, lang, code, skip

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract_blocks(path: Path) -> list[Block]:
    """Fenced code blocks of a markdown file (any language), with the skip marker of the line before each fence.
    ``line`` is the 1-based line of the first code line. An unclosed fence raises ValueError."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, lang = m.group(1), m.group(2), m.group(3).lower()
        prev = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        sm = _SKIP.match(prev)
        body, j = [], i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence[0] * len(fence)):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        if j == len(lines):
            raise ValueError(f"{path}:{i + 1}: unclosed code fence")
        blocks.append(Block(path, i + 2, lang, "\n".join(body) + "\n", sm.group("why") if sm else None))
        i = j + 1
    return blocks


def python_blocks() -> list[Block]:
    return [b for p in DOC_FILES for b in extract_blocks(p) if b.lang in ("python", "py")]


BLOCKS = python_blocks()


@pytest.fixture
def one_thread():
    # the blocks' models are tiny: a second intra-op thread only spins against the other jobs of a shared machine
    # (measured: the hessian.md block 1.45 s with 2 threads vs 0.2 s with 1, at load 7 on 2 cores)
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_snippet_runs(block, tmp_path, monkeypatch, one_thread):
    if block.skip is not None:
        pytest.skip(f"{block.where} marked as a fragment: {block.skip}")
    monkeypatch.chdir(tmp_path)
    # leading newlines keep the markdown line numbers in tracebacks
    code = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
    namespace = {"__name__": "__snippet__"}
    exec(code, namespace)


def test_snippet_inventory():
    """There are python examples, most of them run, and every skip marker sits right before a python block."""
    skipped = [b.where for b in BLOCKS if b.skip is not None]
    assert BLOCKS, "no python blocks found in README.md and docs/*.md"
    assert len(skipped) <= len(BLOCKS) // 2, f"most blocks should run; marked as fragments: {skipped}"
    for path in DOC_FILES:
        lines = path.read_text(encoding="utf-8").splitlines()
        starts = {b.line - 1 for b in extract_blocks(path) if b.lang in ("python", "py")}  # 1-based fence lines
        for n, line in enumerate(lines, 1):
            if _SKIP.match(line):
                nxt = next((k for k in range(n + 1, len(lines) + 1) if lines[k - 1].strip()), None)
                assert nxt in starts, f"{path.relative_to(ROOT)}:{n}: skip marker not followed by a python block"
    print(f"{len(BLOCKS)} python blocks, {len(BLOCKS) - len(skipped)} run, {len(skipped)} marked: {skipped}")


def test_readme_install_and_test_commands_are_the_ones_ci_runs():
    """.ci/run copies README's install and test lines; they must stay verbatim in README.md."""
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme = (ROOT / "README.md").read_text().splitlines()
    for marker in ("# --- README: Install ---", "# --- README: Test ---"):
        cmd = ci[ci.index(marker) + 1]
        assert cmd in readme, f"README.md lacks the line .ci/run runs after {marker!r}: {cmd}"


def test_extractor_reads_markers_languages_and_line_numbers(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("# t\n\n<!-- snippet: skip (fragment: needs a model) -->\n```python\nmodel(x)\n```\n\n"
                  "```bash\nsapsel info\n```\n- item:\n  ```python\n  a = 1\n  ```\n")
    blocks = extract_blocks(md)
    assert [(b.lang, b.line, b.code, b.skip) for b in blocks] == [
        ("python", 5, "model(x)\n", "fragment: needs a model"), ("bash", 9, "sapsel info\n", None),
        ("python", 13, "a = 1\n", None)]
    md.write_text("```python\nx = 1\n")
    with pytest.raises(ValueError, match="unclosed"):
        extract_blocks(md)
