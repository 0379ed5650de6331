"""pleas never loses a user's file when it writes a merged model (pleas.output, save_merged).

Every refusal of :func:`pleas.output.check_output` is exercised, each time checking that the
path was left exactly as it was (file for file, bytes and modes) and that no hidden temp folder
is left next to it.  Replacing an earlier pleas output is checked for the new contents, for
faults injected between writing and renaming, for KeyboardInterrupt, and for SIGTERM and
SIGINT delivered to a real subprocess in the middle of writing.  Runs as root too: where root
ignores permission bits, a read-only location of the kernel (/proc/sys) stands in.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pleas import output
from pleas.merged import FORMAT, MergedModel, load_merged, save_merged
from pleas.models import build_model
from pleas.output import OutputError, check_output, publish

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (itself included): kind, mode and bytes or link target."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [".", *dirnames, *filenames]:
            p = Path(dirpath) / name if name != "." else Path(dirpath)
            st = p.lstat()
            rel = str(p.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                snap[rel] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                snap[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                snap[rel] = ("file", stat.S_IMODE(st.st_mode), p.read_bytes())
    return snap


def leftovers(folder: Path) -> list[str]:
    """Hidden temp or backup entries pleas may have left in ``folder``."""
    return sorted(n for n in os.listdir(folder) if ".pleas-" in n)


def earlier_output(folder: Path, tag: str = "old", report: bool = True) -> Path:
    """A folder as an earlier pleas run leaves it (format-valid merged.json)."""
    folder.mkdir(parents=True)
    (folder / "merged.json").write_text(json.dumps({"format": FORMAT, "arch": "mlp", "tag": tag}))
    (folder / "model.safetensors").write_bytes(b"old weights " + tag.encode())
    if report:
        (folder / "report.json").write_text(json.dumps({"tag": tag}))
    return folder


def new_files(tag: str = "new") -> dict[str, bytes]:
    return {"merged.json": json.dumps({"format": FORMAT, "arch": "mlp", "tag": tag}).encode(),
            "model.safetensors": b"new weights " + tag.encode()}


def tiny_model(seed: int = 0) -> MergedModel:
    torch.manual_seed(seed)
    return MergedModel(build_model("mlp", hidden=(8,)), None, {"arch": "mlp",
                                                              "config": {"hidden": [8]}})


def refused(out, match: str, overwrite: bool = True, report=None) -> None:
    """check_output, publish and save_merged all refuse with the same one-line reason."""
    for call in (lambda: check_output(out, overwrite, report),
                 lambda: publish(out, new_files(), overwrite, report,
                                 None if report is None else b'{"pleas_report": true}'),
                 lambda: save_merged(tiny_model(), out, overwrite,
                                     {"report.json": "{}"} if report else None, report)):
        with pytest.raises(OutputError, match=match) as info:
            call()
        named = Path(report if report is not None else out)
        assert "\n" not in str(info.value) and str(named) in str(info.value)


# ----------------------------------------------------------------------------- refusals


def test_existing_unrelated_folder_is_refused_and_untouched(tmp_path):
    out = tmp_path / "photos"
    (out / "2023").mkdir(parents=True)
    (out / "2023" / "a.jpg").write_bytes(b"\xff\xd8 jpeg")
    (out / "notes.txt").write_text("do not lose me")
    (out / "merged.json").write_text("{not json")  # a look-alike is not a pleas output
    before = snapshot(out)
    for overwrite in (False, True):
        refused(out, "not an earlier pleas output", overwrite)
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_empty_existing_folder_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "not an earlier pleas output")
    assert os.listdir(tmp_path / "empty") == []


def test_folder_holding_the_input_checkpoints_is_refused_and_untouched(tmp_path):
    from pleas.checkpoint import save_checkpoint

    out = tmp_path / "checkpoints"
    out.mkdir()
    for name, seed in (("resnet_a.safetensors", 0), ("resnet_b.safetensors", 1)):
        torch.manual_seed(seed)
        save_checkpoint(build_model("mlp", hidden=(8,)), out / name, arch="mlp",
                        config={"hidden": [8]})
    before = snapshot(out)
    refused(out, "not an earlier pleas output")
    assert snapshot(out) == before and len(before) == 3 and leftovers(tmp_path) == []


def test_existing_file_is_refused_and_untouched(tmp_path):
    out = tmp_path / "merged"
    out.write_text("a file, not a folder")
    refused(out, "exists and is a file")
    assert out.read_text() == "a file, not a folder" and leftovers(tmp_path) == []


def test_symlinks_are_refused_even_to_a_pleas_output(tmp_path):
    target = earlier_output(tmp_path / "real")
    before = snapshot(target)
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    refused(tmp_path / "link", "symbolic link")
    refused(tmp_path / "dangling", "symbolic link")
    assert snapshot(target) == before and not (tmp_path / "nowhere").exists()
    assert leftovers(tmp_path) == []


def test_current_directory_and_its_ancestors_are_refused(tmp_path, monkeypatch):
    work = tmp_path / "project" / "work"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    before = snapshot(tmp_path)
    for out in (".", "..", "./", "sub/..", str(work), str(work.parent), "/"):
        refused(out, "current directory or one above it")
    assert snapshot(tmp_path) == before


def test_a_path_under_a_file_is_refused(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    refused(tmp_path / "file.txt" / "out", "under a file")
    refused(tmp_path / "file.txt" / "deeper" / "out", "under a file")
    assert (tmp_path / "file.txt").read_text() == "x"


def test_a_read_only_location_is_refused(tmp_path):
    """/proc/sys refuses new entries to root as well; chmod is checked where it binds."""
    ro = Path("/proc/sys")
    with pytest.raises(OSError):  # the premise: this really is unwritable, for root too
        os.mkdir(ro / "pleas-probe")
    refused(ro / "pleas-out", "not writable")
    refused(ro / "pleas-out" / "deeper", "not writable")
    refused(tmp_path / "out", "not writable", report=ro / "report.json")

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        if os.geteuid() == 0:  # root may write there: the check must follow real writability
            check_output(locked / "out")
        else:
            refused(locked / "out", "not writable")
        assert os.listdir(locked) == []
    finally:
        locked.chmod(0o755)


def test_report_paths_that_could_lose_data_are_refused(tmp_path):
    out = tmp_path / "out"
    (tmp_path / "reports").mkdir()
    refused(out, "is a folder", report=tmp_path / "reports")
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"my": "data"}))
    refused(out, "not a pleas report", report=mine)
    assert json.loads(mine.read_text()) == {"my": "data"}
    (tmp_path / "link.json").symlink_to(mine)
    refused(out, "symbolic link", report=tmp_path / "link.json")
    refused(out, "under a file", report=mine / "report.json")
    refused(out, "inside the output folder", report=out / "copy.json")
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"pleas_report": True, "run": 1}))
    refused(out, "pass --overwrite", overwrite=False, report=old)
    assert json.loads(old.read_text())["run"] == 1
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_earlier_pleas_output_needs_overwrite_and_stays_untouched(tmp_path):
    out = earlier_output(tmp_path / "m")
    before = snapshot(out)
    with pytest.raises(OutputError, match=r"exists \(an earlier pleas output\); pass "
                                          r"--overwrite to replace it"):
        save_merged(tiny_model(), out)  # overwrite is False by default
    refused(out, "pass --overwrite", overwrite=False)
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_foreign_files_in_a_pleas_output_block_even_overwrite(tmp_path):
    out = earlier_output(tmp_path / "m")
    (out / "notes.txt").write_text("mine")
    (out / "plots").mkdir()
    (out / ".hidden").write_text("mine too")
    before = snapshot(out)
    with pytest.raises(OutputError, match=r"did not write \(\.hidden, notes\.txt, plots\)"):
        check_output(out, overwrite=True)
    refused(out, "pleas never deletes them")
    assert snapshot(out) == before and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- replacing


def test_overwrite_replaces_an_earlier_output_completely(tmp_path):
    out = save_merged(tiny_model(0), tmp_path / "m", extra_files={"report.json": "{}"})
    first = load_merged(out).net.state_dict()
    save_merged(tiny_model(1), out, overwrite=True)
    assert sorted(os.listdir(out)) == ["merged.json", "model.safetensors"]  # old report gone
    second = load_merged(out).net.state_dict()
    want = tiny_model(1).net.state_dict()
    assert all(torch.equal(second[k], want[k]) for k in want)
    assert not all(torch.equal(first[k], second[k]) for k in want)
    assert os.listdir(tmp_path) == ["m"]  # no hidden temp or backup next to it


def test_publish_creates_missing_parents_and_removes_them_on_failure(tmp_path, monkeypatch):
    deep = tmp_path / "a" / "b" / "out"

    def boom(src, dst):
        raise OSError("injected")
    monkeypatch.setattr(output, "_rename_noreplace", boom)
    with pytest.raises(OSError, match="injected"):
        publish(deep, new_files())
    assert os.listdir(tmp_path) == []  # a/ and a/b/ were made by this call and are gone again
    monkeypatch.undo()
    assert publish(deep, new_files()) == deep and (deep / "merged.json").exists()


@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new"])
def test_fault_between_write_and_rename_leaves_the_old_output(tmp_path, monkeypatch, existing):
    out = earlier_output(tmp_path / "m") if existing else tmp_path / "m"
    before = snapshot(out) if existing else None
    staged = []

    def boom(new, old):
        staged.append(sorted(os.listdir(new)))  # everything was written, then the rename fails
        raise OSError("disk on fire")
    monkeypatch.setattr(output, "_exchange" if existing else "_rename_noreplace", boom)
    with pytest.raises(OSError, match="disk on fire"):
        publish(out, new_files(), overwrite=True)
    assert staged == [["merged.json", "model.safetensors"]]
    assert leftovers(tmp_path) == []
    if existing:
        assert snapshot(out) == before
    else:
        assert not os.path.lexists(out)


def test_fallback_swap_failing_halfway_puts_the_old_output_back(tmp_path, monkeypatch):
    out = earlier_output(tmp_path / "m")
    before = snapshot(out)
    monkeypatch.setattr(output, "_RENAMEAT2", None)
    calls = []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise OSError("second rename failed")
        os.rename(src, dst)
    monkeypatch.setattr(output, "_plain_rename", second_fails)
    with pytest.raises(OSError, match="second rename failed"):
        publish(out, new_files(), overwrite=True)
    assert len(calls) == 3  # out -> backup, (new -> out fails), backup -> out
    assert snapshot(out) == before and leftovers(tmp_path) == []


def test_fallback_swap_replaces_without_renameat2(tmp_path, monkeypatch):
    out = earlier_output(tmp_path / "m")
    monkeypatch.setattr(output, "_RENAMEAT2", None)
    publish(out, new_files("fallback"), overwrite=True)
    assert json.loads((out / "merged.json").read_text())["tag"] == "fallback"
    assert sorted(os.listdir(out)) == ["merged.json", "model.safetensors"]
    assert os.listdir(tmp_path) == ["m"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux-only")
def test_renameat2_exchange_swaps_two_folders_atomically(tmp_path):
    assert output._RENAMEAT2 is not None, "glibc renameat2 not found"
    (tmp_path / "x").mkdir(), (tmp_path / "y").mkdir()
    (tmp_path / "x" / "in_x").touch(), (tmp_path / "y" / "in_y").touch()
    assert output._exchange(tmp_path / "x", tmp_path / "y") == tmp_path / "x"
    assert os.listdir(tmp_path / "x") == ["in_y"] and os.listdir(tmp_path / "y") == ["in_x"]


def test_a_folder_appearing_during_the_write_is_never_replaced(tmp_path, monkeypatch):
    out = tmp_path / "m"
    real_fill = output._fill

    def someone_else_creates_out(tmp, files):
        real_fill(tmp, files)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    monkeypatch.setattr(output, "_fill", someone_else_creates_out)
    with pytest.raises(OutputError, match="not an earlier pleas output"):
        publish(out, new_files())
    assert os.listdir(out) == ["theirs.txt"] and leftovers(tmp_path) == []
    # and the last-instant rename itself never replaces, not even an empty folder
    (tmp_path / "src").mkdir()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileExistsError):
        output._rename_noreplace(tmp_path / "src", tmp_path / "empty")
    assert (tmp_path / "src").is_dir() and (tmp_path / "empty").is_dir()


def test_a_file_added_to_the_old_output_at_the_last_instant_survives(tmp_path, monkeypatch):
    """After the swap only pleas' own names are deleted; anything else stays, with a warning."""
    out = earlier_output(tmp_path / "m")
    real_exchange = output._exchange

    def exchange_then_someone_writes(new, old):
        where = real_exchange(new, old)
        (where / "late.txt").write_text("written by someone else during the swap")
        return where
    monkeypatch.setattr(output, "_exchange", exchange_then_someone_writes)
    with pytest.warns(UserWarning, match="holds files pleas did not write"):
        publish(out, new_files(), overwrite=True)
    assert json.loads((out / "merged.json").read_text())["tag"] == "new"
    [kept] = leftovers(tmp_path)
    assert os.listdir(tmp_path / kept) == ["late.txt"]


def test_a_failing_file_write_or_ctrl_c_leaves_nothing(tmp_path, monkeypatch):
    out = earlier_output(tmp_path / "m")
    before = snapshot(out)
    real_write = output._write_file
    for exc in (OSError("no space left"), KeyboardInterrupt()):
        written = []

        def write(path, data, exc=exc):
            if written:
                raise exc
            real_write(path, data)
            written.append(path)
        monkeypatch.setattr(output, "_write_file", write)
        with pytest.raises(type(exc)):
            publish(out, new_files(), overwrite=True)
        assert written and snapshot(out) == before and leftovers(tmp_path) == []


def test_a_failing_report_write_publishes_nothing(tmp_path, monkeypatch):
    out = earlier_output(tmp_path / "m")
    before = snapshot(out)
    rep = tmp_path / "reports" / "r.json"
    real_write_fd, calls = output._write_fd, []

    def third_write_fails(fd, data):  # the two output files, then the report
        calls.append(data)
        if len(calls) == 3:
            os.close(fd)
            raise OSError("report disk full")
        real_write_fd(fd, data)
    monkeypatch.setattr(output, "_write_fd", third_write_fails)
    with pytest.raises(OSError, match="report disk full"):
        publish(out, new_files(), True, rep, b'{"pleas_report": true}')
    assert calls[2] == b'{"pleas_report": true}'
    assert snapshot(out) == before and leftovers(tmp_path) == []
    assert not (tmp_path / "reports").exists()  # created by the call, removed again


def test_save_merged_writes_a_marked_report_copy_and_replaces_only_with_overwrite(tmp_path):
    rep = tmp_path / "r" / "report.json"
    save_merged(tiny_model(), tmp_path / "m", extra_files={"report.json": '{"run": 1}'},
                report=rep)
    assert json.loads(rep.read_text()) == {"pleas_report": True, "run": 1}
    assert json.loads((tmp_path / "m" / "report.json").read_text()) == {"run": 1}
    with pytest.raises(OutputError, match="pass --overwrite"):
        save_merged(tiny_model(), tmp_path / "m2", extra_files={"report.json": "{}"}, report=rep)
    assert not (tmp_path / "m2").exists()
    save_merged(tiny_model(), tmp_path / "m", True, {"report.json": '{"run": 2}'}, rep)
    assert json.loads(rep.read_text())["run"] == 2
    assert leftovers(tmp_path) == [] and leftovers(rep.parent) == []


def test_publish_accepts_only_pleas_own_file_names(tmp_path):
    with pytest.raises(ValueError, match="nothing else"):
        publish(tmp_path / "m", {**new_files(), "notes.txt": b"x"})
    with pytest.raises(ValueError, match="nothing else"):
        publish(tmp_path / "m", {"model.safetensors": b"x"})
    with pytest.raises(ValueError, match="may only hold report.json"):
        save_merged(tiny_model(), tmp_path / "m", extra_files={"notes.txt": "x"})
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- permissions


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644),
                                                       (0o077, 0o700, 0o600)])
def test_written_files_get_normal_permissions(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        rep = tmp_path / "report.json"
        save_merged(tiny_model(), tmp_path / "m", extra_files={"report.json": "{}"}, report=rep)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == dir_mode
    for p in [rep, *(tmp_path / "m").iterdir()]:
        assert stat.S_IMODE(p.stat().st_mode) == file_mode, p


# ----------------------------------------------------------------------------- signals


SCRIPT = textwrap.dedent("""
    import json, pathlib, signal, sys, time
    from pleas import output
    from pleas.merged import FORMAT

    out, marker = sys.argv[1], pathlib.Path(sys.argv[2])
    real_write = output._write_file

    def slow_write(path, data):
        real_write(path, data)
        marker.touch()           # the test signals us now, in the middle of writing
        time.sleep(120)

    output._write_file = slow_write
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    files = {"merged.json": json.dumps({"format": FORMAT, "arch": "mlp"}).encode(),
             "model.safetensors": b"new weights"}
    try:
        with output.handle_termination():
            output.publish(out, files, overwrite=True)
    except output.Terminated as t:
        print("terminated", flush=True)
        sys.exit(t.exit_code)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
    print("finished without a signal", flush=True)
""")


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("existing", [True, False], ids=["replace", "new"])
def test_a_signal_during_the_write_leaves_no_temp_and_the_old_output(tmp_path, sig, code,
                                                                    existing):
    out = earlier_output(tmp_path / "m") if existing else tmp_path / "m"
    before = snapshot(out) if existing else None
    marker, script = tmp_path / "writing.marker", tmp_path / "script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
    proc = subprocess.Popen([sys.executable, str(script), str(out), str(marker)], env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the script never started writing"
            time.sleep(0.05)
        assert leftovers(tmp_path), "the write should be in progress in a hidden temp folder"
        proc.send_signal(sig)
        text, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, text
    assert leftovers(tmp_path) == []
    if existing:
        assert snapshot(out) == before
    else:
        assert not os.path.lexists(out)


def test_handle_termination_restores_the_previous_handler():
    def mine(signum, frame):
        pass
    old = signal.signal(signal.SIGTERM, mine)
    try:
        with output.handle_termination():
            assert signal.getsignal(signal.SIGTERM) is not mine
            with pytest.raises(output.Terminated):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)  # the handler raises during the sleep
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, old)
