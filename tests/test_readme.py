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

import os
import re
import subprocess
import sys
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


def run_section(section: str) -> dict:
    """Runs the README section titled `section` in a new namespace; returns the namespace."""
    document = _SYBIL.parse(README)
    document.namespace.update(keras=keras, tf=tf, trainop=trainop)
    try:
        for example in _examples_by_section(document)[section]:
            example.evaluate()
    finally:
        # The README restores it after its mixed-precision example; this is for one that fails.
        keras.mixed_precision.set_global_policy("float32")
    return document.namespace


@pytest.mark.parametrize("section", _SECTIONS, ids=[_test_id(title) for title in _SECTIONS])
def test_readme_section_runs(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run_section(section)


# The strategy section again, where `MirroredStrategy()` has two replicas: two logical CPUs
# stand in for "every GPU of the machine" (they must be made before TensorFlow starts, hence
# a process of its own). Its hidden check then compares two replicas with one device.
_TWO_REPLICAS = """
import sys
import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
mirrored = tf.distribute.MirroredStrategy
tf.distribute.MirroredStrategy = lambda devices=None, **kwargs: mirrored(
    devices or ["/cpu:0", "/cpu:1"], **kwargs
)
sys.path.insert(0, sys.argv[1])
import test_readme

namespace = test_readme.run_section(sys.argv[2])
print("replicas", namespace["strategy"].num_replicas_in_sync)
"""


def test_readme_strategy_section_on_two_replicas_equals_one_device(tmp_path):
    [section] = [title for title in _SECTIONS if "tf.distribute" in title]
    result = subprocess.run(
        [sys.executable, "-c", _TWO_REPLICAS, str(Path(__file__).parent), section],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TMPDIR": str(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["replicas", "2"]
