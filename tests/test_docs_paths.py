"""Every Python file the READMEs name exists in this repository, or is marked as another
project's ("Ray's `ray/scripts/scripts.py`"). The README once named ``store.py`` after it had
become the ``store/`` package (issue Q)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["README.md", "deploy/README.md"]
#: A path a README names: ``a/b/c.py`` or a bare ``c.py`` (a module of the package).
PATH = re.compile(r"(?<![\w/.-])((?:[\w-]+/)*[\w-]+\.py)\b")
#: Words that mark a path as another project's, within the 40 characters before it.
OTHERS = ("Ray's", "Neural Tangents'", "Falkon's", "scikit-learn's", "JAX's", "Zarr's")


def _resolves(name: str, doc: Path) -> bool:
    if any((base / name).is_file() for base in (ROOT, doc.parent, ROOT / "ntk_scale")):
        return True
    if "/" not in name or name.count("/") == 1:  # a module named inside its package, e.g. gram.py
        return any(p.is_file() for p in (ROOT / "ntk_scale").rglob(name))
    return False


def named_paths(doc: Path) -> list[tuple[int, str, str]]:
    """(line, path, the 40 characters before it) for every .py path the document names."""
    text = doc.read_text()
    out = []
    for m in PATH.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[max(0, m.start() - 40) : m.start()].replace("\n", " ")
        out.append((line, m.group(1), before))
    return out


@pytest.mark.parametrize("name", DOCS)
def test_every_named_module_exists_or_is_marked_as_another_projects(name):
    doc = ROOT / name
    found = named_paths(doc)
    assert len(found) > 3, "the pattern finds the paths the README names"
    stale = [(line, path) for line, path, before in found
             if not _resolves(path, doc) and not any(w in before for w in OTHERS)]  # fmt: skip
    assert not stale, (f"{name} names files that do not exist here: {stale}; fix the name, or "
                       "mark another project's file with its owner (\"Ray's `ray/...py`\")")


def test_the_check_catches_a_stale_name(tmp_path):
    """The negative control: the old name store.py, and another project's path unmarked."""
    doc = tmp_path / "README.md"
    doc.write_text("The store (`store.py`) and `ray/scripts/scripts.py`, and `stages.py`.\n")
    bad = [p for _, p, before in named_paths(doc)
           if not _resolves(p, doc) and not any(w in before for w in OTHERS)]  # fmt: skip
    assert bad == ["store.py", "ray/scripts/scripts.py"]
