"""Every user mistake at the command line: exit code 2, one line on stderr, nothing written.

Each case asserts the exit code, that stderr is exactly one line starting with ``error:`` and
naming the problem, that no file under the test's folder changed (byte for byte, no temp
left behind), and, for the mistakes that can be seen before any data is read, that the
statistics pass never ran (``pleas.pipeline.run_pair`` is replaced by a tripwire).
Interrupts (Ctrl-C, SIGTERM) run the CLI in a subprocess.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import pleas.pipeline
from pleas import zoo
from pleas.checkpoint import save_checkpoint
from pleas.cli import main as pleas_main
from pleas.cli_merge import main
from pleas.models import build_model

torch.set_num_threads(1)
pytestmark = pytest.mark.zoo

ROOT = Path(__file__).resolve().parent.parent
PAIR = ["resnet_a", "resnet_b"]
FAST = ["--batches", "1", "--batch-size", "16", "--positions", "8", "--no-eval", "--quiet"]


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with its sha256 (folders and links marked)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "link:" + os.readlink(p)
        elif p.is_dir():
            out[str(p)] = "dir"
        else:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture
def tripwire(monkeypatch):
    def no_statistics(*args, **kwargs):
        raise AssertionError("the statistics pass ran before the mistake was reported")
    monkeypatch.setattr(pleas.pipeline, "run_models", no_statistics)


def run_cli(argv, capsys, entry=main):
    rc = entry([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_one_line_error(rc, err, words):
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


# ------------------------------------------------------------------------ case builders
def _unrelated_folder(t: Path):
    (t / "mine").mkdir()
    (t / "mine" / "thesis.tex").write_text("years of work")
    return [*PAIR, "--out", t / "mine"]


def _folder_of_inputs(t: Path):
    (t / "ckpts").mkdir()
    for name in PAIR:
        shutil.copy(zoo.info(name).path, t / "ckpts" / f"{name}.safetensors")
    return [t / "ckpts" / "resnet_a.safetensors", t / "ckpts" / "resnet_b.safetensors",
            "--data", "fashion_mnist", "--out", t / "ckpts"]


def _existing_file(t: Path):
    (t / "out.bin").write_bytes(b"\x00user data")
    return [*PAIR, "--out", t / "out.bin"]


def _symlink(t: Path):
    (t / "real").mkdir()
    (t / "link").symlink_to(t / "real")
    return [*PAIR, "--out", t / "link"]


def _under_a_file(t: Path):
    (t / "notes.txt").write_text("x")
    return [*PAIR, "--out", t / "notes.txt" / "merged"]


def _report_dir(t: Path):
    (t / "reports").mkdir()
    return [*PAIR, "--out", t / "o", "--report", t / "reports"]


def _report_user_file(t: Path):
    (t / "summary.json").write_text('{"mine": true}')
    return [*PAIR, "--out", t / "o", "--report", t / "summary.json"]


def _config(t: Path, text: str):
    (t / "c.yaml").write_text(text)
    return ["--config", t / "c.yaml"]


def _bomb_folder(t: Path):
    (t / "imgs").mkdir()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(t / "imgs" / "big.png")
    return [*PAIR, "--data", t / "imgs", "--out", t / "o"]


def _empty_dataset(t: Path):
    import datasets

    datasets.Dataset.from_dict({"image": [Image.new("L", (28, 28))]}).select([]).save_to_disk(
        str(t / "ds"))
    return [*PAIR, "--data", t / "ds", "--out", t / "o"]


def _text_column(t: Path):
    import datasets

    datasets.Dataset.from_dict({"image": ["a.png", "b.png"]}).save_to_disk(str(t / "ds"))
    return [*PAIR, "--data", t / "ds", "--out", t / "o"]


def _huge_metadata(t: Path):
    path = save_checkpoint(build_model("mlp"), t / "huge.safetensors", "mlp",
                           {"hidden": [10 ** 9, 128]})
    return [path, path, "--data", "fashion_mnist", "--out", t / "o"]


def _nan_weights(t: Path):
    model = build_model("resnet20", num_classes=5)
    with torch.no_grad():
        model.fc.weight[0, 0] = float("nan")
    path = save_checkpoint(model, t / "nan.safetensors", "resnet20", {"num_classes": 5})
    return [PAIR[0], path, "--data", "fashion_mnist", "--out", t / "o"]


def _hub_pair(t: Path, mean_b=None, classes=None):
    from own_models import CLASSES, rgb_folder, save_hub, tiny_timm

    save_hub(tiny_timm(1), t / "a", label_names=CLASSES)
    save_hub(tiny_timm(2), t / "b", label_names=CLASSES, mean=mean_b,
             std=None if mean_b is None else (0.5, 0.5, 0.5))
    rgb_folder(t / "imgs", classes=classes or CLASSES, per_class=1)
    return [t / "a", t / "b", "--data", t / "imgs", "--out", t / "o"]


def _plain_tiny(t: Path, *flags):
    from own_models import tiny_timm

    torch.save(tiny_timm(1).state_dict(), t / "tiny.pth")
    return [t / "tiny.pth", t / "tiny.pth", "--data", "fashion_mnist", "--out", t / "o", *flags]


def _config_less_folder(t: Path):
    (t / "weights").mkdir()
    torch.save({}, t / "weights" / "model.pt")
    return [t / "weights", t / "weights", "--out", t / "o"]


CASES = {  # name: (argv builder, words the one line names, checked before any statistics)
    "unknown method": (lambda t: [*PAIR, "--method", "fancy", "--out", t / "o"],
                       ["unknown method", "registered methods"], True),
    "bad heads": (lambda t: [*PAIR, "--heads", "both"], ["--heads", "invalid choice"], True),
    "bad allocation": (lambda t: [*PAIR, "--allocation", "best"], ["--allocation"], True),
    "shared head, two label spaces": (lambda t: [*PAIR, "--heads", "shared", "--out", t / "o"],
                                      ["label spaces differ"], True),
    "width 3": (lambda t: [*PAIR, "--width", "3", "--out", t / "o"], ["width"], True),
    "negative positions": (lambda t: [*PAIR, "--positions", "-1", "--out", t / "o"],
                           ["positions", ">= 0"], True),
    "unrelated folder as out": (_unrelated_folder, ["not an earlier pleas output"], True),
    "folder of the inputs as out": (_folder_of_inputs, ["not an earlier pleas output"], True),
    "a file as out": (_existing_file, ["out.bin"], True),
    "a symlink as out": (_symlink, ["symbolic link"], True),
    "out under a file": (_under_a_file, ["notes.txt"], True),
    "out is .": (lambda t: [*PAIR, "--out", "."], ["current directory"], True),
    "out is ..": (lambda t: [*PAIR, "--out", ".."], ["current directory"], True),
    "read-only out": (lambda t: [*PAIR, "--out", "/proc/sys/pleas-merged"], ["/proc/sys"], True),
    "report is a folder": (_report_dir, ["reports"], True),
    "report is a user file": (_report_user_file, ["summary.json"], True),
    "cuda without a GPU": (lambda t: [*PAIR, "--device", "cuda", "--out", t / "o"],
                           ["no CUDA GPU"], True),
    "unknown device": (lambda t: [*PAIR, "--device", "tpu", "--out", t / "o"],
                       ["unknown device"], True),
    "config: width a list": (lambda t: _config(t, "models: [resnet_a, resnet_b]\nwidth: [1]\n"),
                             ["width", "number"], True),
    "config: batches a word": (lambda t: _config(t, "models: [resnet_a, resnet_b]\n"
                                                    "batches: two\n"), ["batches", "integer"],
                               True),
    "config: models by name": (lambda t: _config(t, "models:\n  - name: resnet_a\n"
                                                    "  - name: resnet_b\n"), ["'model' key"],
                               True),
    "config: out a number": (lambda t: _config(t, "models: [resnet_a, resnet_b]\nout: 5\n"),
                             ["'out'", "string"], True),
    "config: a folder": (lambda t: ["--config", t], ["is not a file"], True),
    "config: task vectors at 1.5": (lambda t: _config(
        t, "models: [sb_fmnist_a, sb_fmnist_b]\nmerge_method: task_arithmetic\n"
           "base: sb_base\nwidth: 1.5\n"), ["use width 1"], True),
    "no data and data": (lambda t: [*PAIR, "--no-data", "--data", "fashion_mnist", "--out",
                                    t / "o"], ["--no-data"], True),
    "decompression bomb": (_bomb_folder, ["big.png", "pixels", "PLEAS_MAX_IMAGE_PIXELS"], True),
    "empty saved dataset": (_empty_dataset, ["holds no images"], True),
    "non-image column": (_text_column, ["image", "str"], True),
    "huge model in metadata": (_huge_metadata, ["huge.safetensors", "implies"], True),
    "NaN weights": (_nan_weights, ["nan.safetensors", "NaN"], True),
    "different preprocessing": (lambda t: _hub_pair(t, mean_b=(0.5, 0.5, 0.5)),
                                ["different preprocessing", "model A", "mean (0.485, 0.456, "
                                 "0.406)", "model B", "mean (0.5, 0.5, 0.5)"], True),
    "a folder without config.json": (_config_less_folder, ["without config.json"], True),
    "unknown timm architecture": (lambda t: _plain_tiny(t, "--arch", "timm:no_such_net"),
                                  ["unknown timm architecture", "no_such_net"], True),
    "state dict of another architecture": (
        lambda t: _plain_tiny(t, "--arch", "timm:resnet18"),
        ["does not match architecture 'timm:resnet18'", "inferred from the weights",
         "--arch-config"], True),
    "state dict against a given config": (
        lambda t: _plain_tiny(t, "--arch", "timm:resnet10t", "--arch-config",
                              '{"channels": [8, 16, 32, 64], "stem_width": 8, '
                              '"num_classes": 5}'),
        ["shape mismatch", "fc.weight (expected (5, 64), got (3, 64))"], True),
    "arch-config not JSON": (lambda t: _plain_tiny(t, "--arch", "timm:resnet10t",
                                                   "--arch-config", "{num_classes: 5"),
                             ["arch_config", "not valid JSON"], True),
    "hub model not cached": (lambda t: ["timm/not_cached_here", "timm/not_cached_here", "--out",
                                        t / "o"],
                             ["not in the Hugging Face cache", "hf download"], True),
    "eval data with other classes": (
        lambda t: [*_hub_pair(t, classes=["ant", "bee", "cow"]), "--eval-data", t / "imgs",
                   "--eval"], ["--eval-data", "not model A's", "ant, bee, cow"], True),
    "eval data with fewer classes": (
        lambda t: [*_hub_pair(t, classes=["cat", "dog"]), "--eval-data", t / "imgs", "--eval"],
        ["--eval-data", "2 classes", "model A (a) 3"], True),
    "eval data missing": (lambda t: [*PAIR, "--eval-data", t / "nowhere", "--eval", "--out",
                                     t / "o"], ["--eval-data", "no such"], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_user_mistakes_exit_2_with_one_line_and_write_nothing(case, tmp_path, capsys,
                                                              tripwire, monkeypatch):
    build, words, early = CASES[case]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PLEAS_MAX_IMAGE_PIXELS", "1000")  # the 64x64 "bomb" is over it
    argv = build(tmp_path)
    capsys.readouterr()  # what building the case printed (datasets' progress bars)
    before = snapshot(tmp_path)
    # the case's own flags come last (they win); a config file keeps its own values
    extra = ["--quiet"] if argv[0] == "--config" else FAST
    rc, _, err = run_cli([*extra, *argv], capsys)
    assert_one_line_error(rc, err, words)
    assert snapshot(tmp_path) == before, case


def test_pleas_spec_reports_the_checkpoints_own_error(tmp_path, capsys):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x13\x37 not safetensors" * 8)
    rc, _, err = run_cli(["spec", bad], capsys, entry=pleas_main)
    assert_one_line_error(rc, err, ["broken.safetensors", "safetensors"])
    assert "unknown architecture" not in err


def test_a_tiny_merge_set_is_a_stated_warning(tmp_path, capsys):
    rc, out, err = run_cli([*PAIR, "--method", "permute", "--width", "1", "--batches", "1",
                            "--batch-size", "8", "--no-eval", "--quiet", "--out", tmp_path / "o"],
                           capsys)
    assert rc == 0, err
    assert "warning: only 8 merge images for groups of up to 64 units" in err
    import json
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert any("only 8 merge images" in w for w in report["warnings"])


def _default_sigint() -> None:
    """In the child before exec: SIGINT back to its default action.  A suite started in the
    background of a non-interactive shell (``cmd &``, as a CI runner may) inherits SIGINT
    ignored, and Python then never raises KeyboardInterrupt: the Ctrl-C test would wait for a
    child that cannot hear it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _cli(args, cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "pleas.merge", *map(str, args)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_sigint)


def _wait_for_cpu(proc: subprocess.Popen, seconds: float, timeout: float = 300.0) -> None:
    """Until the child has used ``seconds`` of CPU time (Linux /proc): a point in its work that
    does not depend on how loaded the machine is, unlike a fixed sleep."""
    tick = os.sysconf("SC_CLK_TCK")
    start = time.monotonic()
    while time.monotonic() - start < timeout and proc.poll() is None:
        fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        if (int(fields[11]) + int(fields[12])) / tick >= seconds:  # utime + stime
            return
        time.sleep(0.2)


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"),
                                             (signal.SIGTERM, 143, "terminated")])
def test_an_interrupt_leaves_the_earlier_output_and_no_temp(tmp_path, sig, code, word):
    """A merge over an earlier output (--overwrite), interrupted while it runs: one line, the
    exit code of the signal, the earlier output byte for byte, no temp folder."""
    out = tmp_path / "merged"
    first = _cli([*PAIR, "--method", "permute", "--width", "1", *FAST, "--out", out], tmp_path)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    before = snapshot(tmp_path)
    proc = _cli([*PAIR, "--batches", "64", "--batch-size", "64", "--no-eval", "--quiet",
                 "--overwrite", "--out", out], tmp_path)
    _wait_for_cpu(proc, 14.0)  # past imports (~8 CPU-s) and loading, into the merge's work
    assert proc.poll() is None, proc.stderr.read()
    proc.send_signal(sig)
    rc = proc.wait(timeout=120)
    err = proc.stderr.read()
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in err, err
    assert snapshot(tmp_path) == before
