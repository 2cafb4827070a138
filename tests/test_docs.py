"""The code blocks of README.md and docs/USAGE.md marked runnable are run as they stand.

A fenced ```python block right after a line ``<!-- runnable -->`` runs in this process; after
``<!-- runnable: 2 ranks -->`` it runs on each of 2 gloo ranks (the process group is set up, as
torchrun would, before the block runs). A doc that changes so that its snippet no longer runs
fails here.
"""

import re

import pytest

from _dist import run
from _procs import ROOT

_MARK = re.compile(r"<!-- runnable(?:: (\d+) ranks)? -->\n```python\n(.*?)```", re.S)


def _snippets():
    out = []
    for doc in ("README.md", "docs/USAGE.md"):
        text = (ROOT / doc).read_text(encoding="utf-8")
        for i, m in enumerate(_MARK.finditer(text)):
            line = text[: m.start()].count("\n") + 2
            out.append(pytest.param(m.group(2), int(m.group(1) or 1), f"{doc}:{line}",
                                    id=f"{doc}:{line}"))
    return out


SNIPPETS = _snippets()


def test_the_docs_mark_snippets():
    docs = {p.values[2].split(":")[0] for p in SNIPPETS}
    assert docs == {"README.md", "docs/USAGE.md"}, docs


@pytest.mark.parametrize("code, ranks, name", SNIPPETS)
def test_snippet_runs(code, ranks, name):
    if ranks == 1:
        exec(compile(code, name, "exec"), {"__name__": f"snippet:{name}"})
    else:
        import _docs_worker

        assert run(_docs_worker.run_snippet, ranks, code=code, name=name) == ["ran"] * ranks
