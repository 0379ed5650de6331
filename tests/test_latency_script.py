"""experiments/latency.py end to end on one small pair: each pair is measured in a child
process and its result comes back whole (rows, MACs, the table).  Nothing here checks a time:
only that the machinery measures what the table says it measures."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import latency  # noqa: E402


def test_one_pair_in_its_own_process_gives_the_full_table(tmp_path):
    assert latency.main(["--pairs", "vit", "--rounds", "1", "--warmup", "0",
                         "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "latency.json").read_text())
    assert results["own_process"] is True
    (pair,) = results["pairs"]
    assert pair["key"] == "vit"
    assert [r["width"] for r in pair["rows"]] == list(latency.WIDTHS)
    for row in pair["rows"]:
        # the dense model's executed MACs follow the width (counted on its forward pass)
        assert abs(row["dplan_macs"] - row["width"]) <= 0.01 * row["width"]
        assert row["dplan_ratio"] > 0 and row["target"] == row["width"] * latency.SLACK
    text = (tmp_path / "latency.md").read_text()
    assert "each pair in a process of its own" in text
    assert "**vit_a + vit_b" in text and (tmp_path / "latency.png").stat().st_size > 0


def test_a_failing_child_is_reported_not_hidden(tmp_path, monkeypatch):
    monkeypatch.setattr(latency, "__file__", str(tmp_path / "missing.py"))
    assert latency.main(["--pairs", "vit", "--rounds", "1", "--out", str(tmp_path)]) == 1
    assert not (tmp_path / "latency.json").exists()
