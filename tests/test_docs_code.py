"""The docs' Python blocks: scripts/check_wheel.sh (CI) runs every one from the installed wheel outside the checkout
(tests/docs_blocks.py); here, that the harness covers every block it should: each placeholder it fills in and
each block it leaves out names something that is in the docs, and CI runs it."""
from __future__ import annotations

from tests import docs_blocks
from tests.helpers import REPO


def test_the_harness_matches_the_docs_and_ci_runs_it():
    texts = {page.relative_to(REPO).as_posix(): docs_blocks.python_blocks(page) for page in docs_blocks.pages(REPO)}
    everything = "\n".join(block for blocks in texts.values() for block in blocks)
    unused = [p for p in docs_blocks.PLACEHOLDERS if p not in everything]
    assert not unused, f"placeholders no docs block has any more: {unused}"
    for page, index in docs_blocks.NOT_RUN:
        assert index < len(texts.get(page, [])), f"{page} has no Python block {index}"
    assert sum(map(len, texts.values())) - len(docs_blocks.NOT_RUN) >= 7  # README 1, sampling 5, training 1
    assert "tests/docs_blocks.py" in (REPO / "scripts/check_wheel.sh").read_text()


def test_a_failing_block_is_reported_with_its_page_and_index(tmp_path):
    (tmp_path / "README.md").write_text("```python\nx = 1\n```\n\n```python\nraise ValueError('broken')\n```\n")
    ran, failures = docs_blocks.run_page(tmp_path, tmp_path / "README.md")
    assert ran == 1 and len(failures) == 1 and failures[0].startswith("README.md block 1:")
    assert "ValueError: broken" in failures[0]
