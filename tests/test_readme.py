"""The README's Python examples run as written (Sybil).

Each `## ` section of README.md that holds Python is a test of its own: its fenced ```python
blocks run in order, in one namespace, with the invisible code blocks between them
(`<!-- invisible-code-block: python ... -->`) that make the small data, models and loss
functions a block leaves to the reader and check what the prose says of it. The namespace starts
with what the README's first example imports (`keras`, `tf`, `trainop`), and the working
directory and `tempfile`'s directory are the test's own, so that what a block writes ("logs",
"run1", `tempfile.mkdtemp()`) goes there.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import keras
import pytest
import tensorflow as tf
from sybil import Sybil
from sybil.parsers.markdown import PythonCodeBlockParser

import trainop

README = Path(__file__).resolve().parents[1] / "README.md"
_SYBIL = Sybil([PythonCodeBlockParser()])
_HEADING = re.compile(r"^## (.+)$", re.MULTILINE)


def _examples_by_section(document) -> dict[str, list]:
    """The document's examples, in order, under the title of the `## ` section they are in."""
    examples = list(document)
    inside = [(example.start, example.end) for example in examples]
    headings = [
        (match.start(), match.group(1))
        for match in _HEADING.finditer(document.text)
        if not any(start <= match.start() < end for start, end in inside)
    ]
    sections: dict[str, list] = {}
    for example in examples:
        title = next(
            (title for start, title in reversed(headings) if start < example.start), "Intro"
        )
        sections.setdefault(title, []).append(example)
    return sections


_SECTIONS = list(_examples_by_section(_SYBIL.parse(README)))


def _test_id(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


@pytest.mark.parametrize("section", _SECTIONS, ids=[_test_id(title) for title in _SECTIONS])
def test_readme_section_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    document = _SYBIL.parse(README)  # a new namespace
    document.namespace.update(keras=keras, tf=tf, trainop=trainop)
    try:
        for example in _examples_by_section(document)[section]:
            example.evaluate()
    finally:
        # The README restores it after its mixed-precision example; this is for one that fails.
        keras.mixed_precision.set_global_policy("float32")
