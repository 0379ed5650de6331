"""README's tested-architecture list is the one scripts/tested_archs.py generates from
tests/archs.py (regenerate with ``python scripts/tested_archs.py --write``)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_lists_exactly_the_tested_architectures():
    spec = importlib.util.spec_from_file_location("tested_archs", ROOT / "scripts" / "tested_archs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    readme = (ROOT / "README.md").read_text()
    assert script.markdown() in readme, "run: python scripts/tested_archs.py --write"
    assert script.rewrite(readme) == readme
