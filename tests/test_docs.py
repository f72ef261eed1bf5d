"""The docs cannot rot: the API reference is generated from the code and must be current, and
every public name is documented."""

import importlib
import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import gen_api  # noqa: E402


def test_api_reference_is_current():
    # regenerate with: python docs/gen_api.py
    assert (ROOT / "docs" / "api.md").read_text() == gen_api.render()


def test_every_public_name_is_in_the_api_reference_with_a_docstring():
    text = (ROOT / "docs" / "api.md").read_text()
    assert "(undocumented)" not in text
    for modname in gen_api.MODULES:
        for name in importlib.import_module(modname).__all__:
            assert f"`{name}`" in text, (modname, name)


def test_readme_and_docs_link_to_pages_that_exist():
    import re

    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+\.(?:md|png))\)", page.read_text()):
            assert (page.parent / target).exists(), (page.name, target)


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = "bash scripts/setup.sh && .venv/bin/python -m pytest"
    assert test_cmd in readme and test_cmd in ci
    assert "bash scripts/setup.sh && .venv/bin/python examples/digits.py" in readme
    assert runpy.run_path(str(ROOT / "examples" / "digits.py"), run_name="not_main")["main"]
