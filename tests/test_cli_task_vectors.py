"""The merge CLI with task-vector methods (--base, --param)."""
import json

import pytest
import torch

from pleas.cli_merge import main
from pleas.merged import load_merged

torch.set_num_threads(1)

COMMON = ["--batches", "2", "--batch-size", "32", "--eval-limit", "200", "--quiet"]


def test_task_arithmetic_on_a_same_base_pair(tmp_path):
    out = tmp_path / "ta"
    rc = main(["sb_fmnist_a", "sb_fmnist_b", "--method", "task_arithmetic", "--base", "sb_base",
               "--param", "lam=0.5", "--out", str(out), *COMMON])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "task_arithmetic" and report["params"]["lam"] == 0.5
    assert report["shared_base"] is True
    assert report["width"]["achieved"] == 1.0
    acc = report["accuracy"]
    assert set(acc) == {"fashion_mnist:0-4", "fashion_mnist:5-9"}
    # measured 80-90 on both halves; chance is 20
    assert all(row["merged"] > 60 for row in acc.values())
    model = load_merged(out)
    assert model.multi_head


def test_ties_flags_a_pair_without_a_common_base(tmp_path, capsys):
    out = tmp_path / "ties"
    rc = main(["digits_a", "digits_b", "--method", "ties", "--base", "digits_base1", "--out",
               str(out), *COMMON])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shared_base"] is False and report["warnings"]


@pytest.mark.parametrize("extra, message", [
    ([], "--base"),
    (["--base", "sb_base", "--width", "1.5"], "use width 1"),
    (["--base", "sb_base", "--param", "nonsense"], "KEY=VALUE"),
    (["--base", "sb_base", "--param", "bogus=1"], "bogus"),
])
def test_task_vector_errors(tmp_path, capsys, extra, message):
    out = tmp_path / "bad"
    rc = main(["sb_fmnist_a", "sb_fmnist_b", "--method", "task_arithmetic", "--out", str(out),
               *extra, *COMMON])
    assert rc == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # no output folder, no temp
