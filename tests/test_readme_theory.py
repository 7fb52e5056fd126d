"""README.md's "The mathematics" section resolves the docstrings' "THEORY section N" citations."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _cited_sections():
    cited = set()
    for path in list((ROOT / "quotient_sgd").rglob("*.py")) + list((ROOT / "experiments").rglob("*.py")):
        text = path.read_text()
        assert "THEORY.md" not in text, f"{path} points to THEORY.md, which is not part of the repository"
        for m in re.finditer(r"THEORY sections? (\d+)(?:\s*(?:-|,|and)\s*(\d+))*", text):
            cited.update(int(n) for n in re.findall(r"\d+", m.group(0)))
    return cited


def test_readme_mathematics_has_every_cited_section():
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## The mathematics\n")
    end = readme.index("\n## ", start + 1)
    section = readme[start:end]
    numbered = {int(n) for n in re.findall(r"^### (\d+)\. ", section, flags=re.M)}
    cited = _cited_sections()
    assert cited and cited <= numbered, (sorted(cited), sorted(numbered))
    assert numbered == set(range(1, max(numbered) + 1))
