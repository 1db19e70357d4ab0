"""Atomic writes keep the umask's permissions: what the CLI and library write is readable by others under umask 022
(0644 files, 0755 folders) and stays private under 077 — tempfile's 0600/0700 must not leak through the rename."""

import json
import os
import stat

import numpy as np
import pytest

from lepton_jax import files, tracking
from lepton_jax.cli import main
from lepton_jax.lake.synthetic import write_activity_csv
from lepton_jax.serve.export import export_artifact


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


@pytest.mark.parametrize("umask", [0o022, 0o077], indirect=True, ids=["umask022", "umask077"])
def test_written_files_and_folders_follow_the_umask(umask, trained_run, tmp_path, capsys):
    workdir, _ = trained_run
    file_mode, dir_mode = 0o666 & ~umask, 0o777 & ~umask
    out = tmp_path / "out"
    np.save(tmp_path / "x.npy", np.zeros((3, 8, 8, 1), np.float32))
    assert main(["predict", "--workdir", str(workdir), "--input", str(tmp_path / "x.npy"),
                 "--output", str(out / "classes.npy")]) == 0
    assert main(["runs", "compare", str(workdir), "--plot", str(out / "curves.png")]) == 0
    run = tracking.RunDir(out / "run")
    (out / "run").mkdir()
    tracking.write_json_atomic(run.path / "summary.json", {"test_accuracy": 1.0})
    (run.path / tracking.METRICS_FILE).write_text(json.dumps({"step": 1}) + "\n" + json.dumps({"step": 2}) + "\n")
    run.truncate_metrics(after_step=1)
    write_activity_csv(out / "data" / "activity.csv", sessions=1, seconds_per_activity=1.0)
    export_artifact(workdir, out / "edge" / "digits", eval_split=None, platforms=("cpu",))
    capsys.readouterr()

    written = [out / "classes.npy", out / "curves.png", run.path / "summary.json", run.path / tracking.METRICS_FILE,
               out / "data" / "activity.csv", *sorted((out / "edge" / "digits").iterdir())]
    assert len(written) == 9 and "manifest.json" in {p.name for p in written}
    assert {p.name: oct(_mode(p)) for p in written} == {p.name: oct(file_mode) for p in written}
    assert oct(_mode(out / "edge" / "digits")) == oct(dir_mode)
    assert json.loads((run.path / tracking.METRICS_FILE).read_text()) == {"step": 1}
    assert not [p for p in out.rglob(".*")], "temp files left behind"


@pytest.mark.parametrize("umask", [0o022], indirect=True)
def test_a_failed_write_leaves_the_old_file_and_no_temp_file(umask, tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    with pytest.raises(RuntimeError), files.atomic_write(path) as f:
        f.write("partial")
        raise RuntimeError("disk full")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["a.json"]
    with pytest.raises(RuntimeError), files.temp_dir(tmp_path / "edge") as tmp:
        (tmp / "f").write_text("x")
        assert _mode(tmp) == 0o755
        raise RuntimeError("export failed")
    assert os.listdir(tmp_path) == ["a.json"]


def test_a_durable_write_fsyncs_the_folders_it_creates_and_the_new_name(tmp_path, monkeypatch):
    """``durable=True`` (the lake's writes): the parent of every folder it creates, and the file's own folder after
    the rename, are fsynced; a plain atomic write fsyncs the file only."""
    synced = []
    real_fsync = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with files.atomic_write(tmp_path / "a" / "b" / "x.bin", "wb", durable=True) as f:
        f.write(b"payload")
    assert (tmp_path / "a" / "b" / "x.bin").read_bytes() == b"payload"
    folders = [p for p in synced if os.path.isdir(p)]
    assert folders == [str(tmp_path), str(tmp_path / "a"), str(tmp_path / "a" / "b")], synced
    synced.clear()
    with files.atomic_write(tmp_path / "c" / "y.txt") as f:
        f.write("x")
    assert not [p for p in synced if os.path.isdir(p)] and len(synced) == 1, synced
