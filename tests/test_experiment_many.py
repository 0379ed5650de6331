"""experiments/many.py's bookkeeping: ``--update`` with some methods re-runs only those and
keeps the other methods' rows, and the report says which command made which rows."""
from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _many():
    spec = importlib.util.spec_from_file_location("many_script", ROOT / "experiments" / "many.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(method, width, command=None):
    row = {"method": method, "width": width, "normalised_mean": 0.5,
           "normalised": {"t": 0.5}}
    if command:
        row["command"] = command
    return row


def test_update_keeps_the_rows_of_methods_not_run_again():
    many = _many()
    old = [{"experts": ["a", "b"], "rows": [_row("pleas_closed", 1.0), _row("pleas", 1.0),
                                            _row("pleas", 1.5), _row("permute", 1.0)]}]
    kept = many.rows_kept(old, ["pleas"])
    assert [r["method"] for r in kept[("a", "b")]] == ["pleas_closed", "permute"]
    new = [_row("pleas", 1.0, "cmd2"), _row("pleas", 1.5, "cmd2")]
    rows = many.joined_rows(kept[("a", "b")], new)
    assert [(r["method"], r["width"]) for r in rows] == [
        ("pleas_closed", 1.0), ("pleas", 1.0), ("pleas", 1.5), ("permute", 1.0)]
    assert all(r.get("command") == "cmd2" for r in rows if r["method"] == "pleas")
    text = many._rows_by_command([{"experts": ["a", "b"], "rows": rows}])
    assert "pleas: `cmd2`" in text and "pleas_closed: the earlier commands" in text
