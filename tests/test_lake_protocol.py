"""The commit protocol's edges: gc next to live writers, rebase checks, log continuity, record publishing, roots."""

import errno
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from lepton_jax.cli import main
from lepton_jax.errors import LakeError
from lepton_jax.lake import Lake, ingest, records
from lepton_jax.lake.faults import ENV
from lepton_jax.lake.publish import publish_new
from lepton_jax.lake.storage import CLOCK_PROBE_PREFIX, open_storage
from lepton_jax.serve.registry import Registry
from tests.lake_data import ClockAhead, npz_shard, npz_source

WRITER = """
import os, sys, time
from pathlib import Path
from lepton_jax.lake import Lake, NpzSource, ingest
lake = Lake(sys.argv[1], target_shard_bytes=1024)
paced_by = os.environ.get("GC_ROUNDS_FILE")  # append k starts once gc finished round k+1: they interleave under load
for k, path in enumerate(sys.argv[2:]):
    deadline = time.monotonic() + 60
    while paced_by and int(Path(paced_by).read_text() or 0) <= k and time.monotonic() < deadline:
        time.sleep(0.01)
    ingest(lake, "t", NpzSource(path, value_range=(0, 255), split_key="split"), mode="append", retries=3)
"""


def _lake_with_versions(root, tmp_path, n):
    lake = Lake(root, target_shard_bytes=1024)
    for k in range(n):
        ingest(lake, "t", npz_source(npz_shard(tmp_path / f"s{k}.npz", k)), mode="append")
    return Lake(root)


def _one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# -- gc next to a live writer ----------------------------------------------------------------------------------------

def test_gc_looping_next_to_a_writer_never_removes_data_a_version_publishes(any_root, tmp_path, capsys):
    root = any_root
    storage = open_storage(root)
    sources = [npz_shard(tmp_path / f"a{k}.npz", k) for k in range(11)]
    ingest(Lake(root, target_shard_bytes=1024), "t", npz_source(sources[0]))
    # a writer SIGKILLed after writing its data: a lease it never released, and an orphan
    subprocess.run([sys.executable, "-c", WRITER, str(root), str(sources[1])], env={**os.environ, ENV: "data"},
                   capture_output=True)
    orphans = set(storage.list("t/data/")) - {Lake(root).table("t").record["commit_id"]}
    assert len(orphans) == 1 and storage.list("t/_leases/") == [f"{next(iter(orphans))}.json"]
    counter = tmp_path / "gc_rounds"
    counter.write_text("0")
    with open(tmp_path / "writer.log", "w+") as log:  # a file, not a pipe: nobody reads it while gc loops
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(root), *map(str, sources[1:])],
                                  stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "GC_ROUNDS_FILE": str(counter)})
        rounds = 0
        while writer.poll() is None or rounds < 2:  # gc as aggressive as allowed, and with --force
            grace = ["--grace-seconds", "60"] if rounds % 2 else ["--grace-seconds", "0", "--force"]
            assert main(["lake", "gc", "--lake", str(root), *grace]) == 0, capsys.readouterr().err
            rounds += 1
            counter.write_text(str(rounds))
        assert writer.wait() == 0, (tmp_path / "writer.log").read_text()
    lake = Lake(root)
    assert lake.versions("t") == list(range(1, 12))  # 10 appends published, one after the other
    assert lake.verify() == []  # every file of every version is there and matches its digests
    if storage.local_path("") is not None:  # same host, local lake: the dead writer's pid shows its lease is dead
        assert not orphans & set(storage.list("t/data/"))  # so its data was collected
        assert storage.list("t/_leases/") == []
    else:  # an object store: a lease is live until it is older than the grace (>= 60 s), whoever holds it
        assert orphans <= set(storage.list("t/data/"))
        assert storage.list("t/_leases/") == [f"{next(iter(orphans))}.json"]
    assert rounds >= 10, rounds


def test_gc_judges_a_lease_from_another_pid_namespace_by_its_age(tmp_path):
    """A writer in a container that shares this host's name (host networking) and the lake's folder: its pid means
    another process here, so gc must not call its lease dead from the pid, only from the lease's age. The same lease
    from this PID namespace whose process is gone is dead at once (its data collected by the next gc)."""
    import socket

    lake = _lake_with_versions(tmp_path / "lake", tmp_path, 1)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)  # reaped: no such process now
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    ours = f"{boot}/{os.readlink('/proc/self/ns/pid')}"  # this boot and PID namespace
    with lake.lease("t", "20000101T000000-aaaaaaaaaaaa"):  # what this process writes in its own leases
        lease = json.loads(lake.storage.read("t/_leases/20000101T000000-aaaaaaaaaaaa.json"))
    assert lease["pid_namespace"] == ours
    for namespace, kept in ((f"another-boot/{ours.split('/', 1)[1]}", True), ("x/pid:[1]", True), (ours, False)):
        cid = "20000101T000000-0123456789ab"
        orphan = f"t/data/{cid}"
        lake.storage.write(f"{orphan}/train/00000/_rows.sha256", b"x" * 32)
        os.utime(lake.storage.local_path(orphan), (1, 1))
        lake.storage.write(f"t/_leases/{cid}.json", json.dumps(
            {"commit_id": cid, "host": socket.gethostname(), "pid": dead_pid, "pid_start": 1,
             "pid_namespace": namespace, "time": time.time()}).encode())
        removed = lake.gc(0, force=True).removed
        assert (removed == []) == kept and (lake.storage.tree(orphan) is not None) == kept, namespace
        lake.storage.delete(f"t/_leases/{cid}.json")
        lake.gc(0, force=True)
    assert lake.verify() == []


def test_gc_judges_an_unreadable_lease_by_its_age(tmp_path):
    """A damaged lease (not JSON) does not pin its commit's data forever: live while it is younger than the grace,
    then dead like any expired lease (its data and the lease itself collected)."""
    lake = _lake_with_versions(tmp_path / "lake", tmp_path, 1)
    cid = "20000101T000000-0123456789ab"
    orphan, lease = f"t/data/{cid}", f"t/_leases/{cid}.json"
    lake.storage.write(f"{orphan}/train/00000/_rows.sha256", b"x" * 32)
    os.utime(lake.storage.local_path(orphan), (1, 1))
    lake.storage.write(lease, b"\x00{not json")
    assert lake.gc(0, force=True).removed == [] and lake.storage.exists(lease)  # fresh: live
    os.utime(lake.storage.local_path(lease), (1, 1))
    assert lake.gc(0, force=True).removed == [orphan] and not lake.storage.exists(lease)
    assert lake.verify() == []


@pytest.mark.parametrize("argv, message", [
    (["--grace-seconds", "0"], "below the minimum 60 s"),
    (["--grace-seconds", "59"], "below the minimum 60 s"),
    (["--grace-seconds", "-1"], "finite number of seconds >= 0"),
    (["--grace-seconds", "nan"], "finite number of seconds >= 0"),
    (["--grace-seconds", "nan", "--force"], "finite number of seconds >= 0"),
    (["--grace-seconds", "-5", "--force"], "finite number of seconds >= 0"),
])
def test_gc_refuses_a_grace_period_it_cannot_honour(tmp_path, capsys, argv, message):
    root = _lake_with_versions(tmp_path / "lake", tmp_path, 1).root
    assert main(["lake", "gc", "--lake", str(root), *argv]) == 2
    assert message in _one_error_line(capsys)


def test_gc_keeps_data_of_a_live_lease_and_the_writer_rechecks_its_files(any_root, tmp_path):
    lake = _lake_with_versions(any_root, tmp_path, 1)
    orphan = "t/data/20000101T000000-0123456789ab"
    with lake.lease("t", "20000101T000000-0123456789ab"):
        lake.storage.write(f"{orphan}/train/00000/_rows.sha256", b"x" * 32)
        if lake.storage.local_path("") is not None:
            os.utime(lake.storage.local_path(orphan), (1, 1))
        assert lake.gc(0, force=True).removed == [] and lake.storage.tree(orphan) is not None
        assert lake.gc(60).kept_young == [orphan]
    assert lake.gc(0, force=True).removed == [orphan] and lake.storage.tree(orphan) is None
    # a commit whose data vanished before its record was linked publishes nothing (one clear error)
    src = npz_source(npz_shard(tmp_path / "b.npz", 9))

    class Vanishing(Lake):  # the image shards of the new fragment disappear between writing and publishing
        def publish(self, table, commit_id, **kwargs):
            prefix = f"{table}/data/{commit_id}/train"
            shards = [rel for rel in self.storage.list_recursive(prefix) if "/image/c." in rel]
            assert shards
            for rel in shards:
                self.storage.delete(f"{prefix}/{rel}")
            return super().publish(table, commit_id, **kwargs)

    with pytest.raises(LakeError, match="missing or changed before it was published"):
        ingest(Vanishing(any_root, target_shard_bytes=1024), "t", src, mode="append")
    assert Lake(any_root).versions("t") == [1] and Lake(any_root).verify() == []

    class Counting(Lake):  # the check before publishing lists the commit's directory once: no request per file
        def _check_written(self, table, commit_id, splits, quarantine):
            calls = {"stat": 0, "list_recursive": 0}
            storage = self.storage

            def counting(name):
                real = getattr(storage, name)

                def counted(key):
                    calls[name] += 1
                    return real(key)
                return counted

            for name in calls:
                setattr(storage, name, counting(name))
            try:
                super()._check_written(table, commit_id, splits, quarantine)
            finally:
                for name in calls:
                    delattr(storage, name)
            self.checked = calls

    counting = Counting(any_root, target_shard_bytes=1024)
    version = ingest(counting, "t", src, mode="append").version
    files = [f for frags in version.record["splits"].values() for frag in frags["fragments"]
             if frag["path"].startswith(f"data/{version.record['commit_id']}/")
             for m in frag["arrays"].values() for f in m["files"]]
    assert len(files) >= 10 and counting.checked == {"stat": 0, "list_recursive": 1}
    assert Lake(any_root).verify() == []


def test_gc_ages_data_and_leases_by_the_storages_clock_not_this_machines(any_root, tmp_path):
    """gc runs on a machine whose clock is two hours ahead of the storage's: a commit directory written a moment ago
    (a writer that just crashed) and one under a lease renewed a moment ago (a live writer on another host, as an
    object store sees it) are both young, whatever this machine's clock says."""
    import lepton_jax.lake.commit as commit

    lake = _lake_with_versions(any_root, tmp_path, 1)
    crashed, leased = "t/data/20000101T000000-0123456789ab", "t/data/20000101T000000-ba9876543210"
    lake.storage.write(f"{crashed}/train/00000/_rows.sha256", b"x" * 32)

    with lake.lease("t", leased.rsplit("/", 1)[1]), pytest.MonkeyPatch.context() as mp:
        lake.storage.write(f"{leased}/train/00000/_rows.sha256", b"x" * 32)
        mp.setattr(commit, "time", ClockAhead(7200))  # the lake's view of the clock only
        mp.setattr(commit, "_pid_alive", lambda pid: False)  # judge the lease by its age, as on S3
        report = lake.gc(3600)
        assert report.removed == [] and sorted(report.kept_young) == sorted([crashed, leased])
        assert lake.storage.tree(crashed) is not None and lake.storage.tree(leased) is not None
    assert lake.verify() == [] and not [k for k in lake.storage.list("") if k.startswith(CLOCK_PROBE_PREFIX)]
    typo = tmp_path / "no-such-lake"  # a mistyped root: gc finds nothing and its clock probe creates nothing
    assert Lake(typo).gc(3600).removed == [] and Registry(typo).gc(3600) == [] and not typo.exists()


# -- rebase re-runs the checks ---------------------------------------------------------------------------------------

def test_a_first_ingest_that_loses_the_race_is_checked_against_the_winners_schema(any_root, tmp_path):
    root = any_root
    small, large = npz_shard(tmp_path / "s.npz", 0), npz_shard(tmp_path / "l.npz", 1, shape=(6, 6))

    class Racing(Lake):  # the other writer commits exactly between this one's checks and its publish
        raced = False

        def publish(self, *args, **kwargs):
            if not Racing.raced:
                Racing.raced = True
                ingest(Lake(self.root), "t", npz_source(large))
            return super().publish(*args, **kwargs)

    with pytest.raises(LakeError, match="has arrays .* this source gives"):
        ingest(Racing(root), "t", npz_source(small), retries=3)
    lake = Lake(root)
    assert lake.versions("t") == [1] and lake.table("t").schema["arrays"]["image"]["example_shape"] == [6, 6]
    assert lake.storage.list("t/data/") == [lake.table("t").record["commit_id"]]


def test_concurrent_first_ingests_of_different_schemas_commit_exactly_one(any_root, tmp_path):
    root = any_root
    cmd = [sys.executable, "-m", "lepton_jax", "lake", "ingest", "--lake", str(root), "--table", "t", "--source"]
    procs = [subprocess.Popen([*cmd, f"npz:{npz_shard(tmp_path / f'{k}.npz', k, shape=shape)}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, shape in enumerate([(8, 8, 1), (6, 6)])]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    err = next(e for rc, e in results if rc == 2).strip().splitlines()
    assert len(err) == 1 and "this source gives" in err[0] and "--allow-schema-change" in err[0], err
    assert Lake(root).versions("t") == [1] and Lake(root).verify() == []


# -- the log: continuity, chain, no reused version numbers -------------------------------------------------------------

def test_verify_names_a_missing_middle_record_and_gc_refuses_to_collect(any_root, tmp_path, capsys):
    lake = _lake_with_versions(any_root, tmp_path, 3)
    lake.storage.delete("t/_log/00000002.json")
    assert main(["lake", "verify", "--lake", str(lake.root), "--files-only"]) == 2
    out = capsys.readouterr().out
    assert "BAD t@2" in out and "gap in the log: the record of version 2 (between versions 1 and 3)" in out
    assert main(["lake", "gc", "--lake", str(lake.root)]) == 2
    assert "not collecting table 't'" in _one_error_line(capsys)


def test_a_removed_latest_record_is_named_and_its_version_number_never_reused(any_root, tmp_path, capsys):
    lake = _lake_with_versions(any_root, tmp_path, 3)
    lake.storage.delete("t/_log/00000003.json")
    assert main(["lake", "verify", "--lake", str(lake.root), "--files-only"]) == 2
    assert "record of version 3 (the latest version) is missing" in capsys.readouterr().out
    assert main(["lake", "ls", "--lake", str(lake.root)]) == 2  # lists what it can, then names the gap
    assert "t@3 (its record is missing)" in _one_error_line(capsys)
    assert main(["lake", "ingest", "--lake", str(lake.root), "--table", "t", "--mode", "append",
                 "--source", f"npz:{npz_shard(tmp_path / 'new.npz', 7)}"]) == 2
    assert "version 3 was published before" in _one_error_line(capsys)
    assert Lake(lake.root).versions("t") == [1, 2]


def test_a_commit_landing_between_the_log_listings_is_not_a_gap(any_root, tmp_path):
    """check_log (used by verify and gc) lists two prefixes; a writer publishing between the two listings must not
    look like a missing record (found by gc looping next to a writer on S3)."""
    _lake_with_versions(any_root, tmp_path, 1)
    src = npz_source(npz_shard(tmp_path / "late.npz", 5))

    class Racing(Lake):  # the first listing check_log makes is followed at once by another writer's commit
        armed = False

        def _then_commit(self, listing):
            if Racing.armed:
                Racing.armed = False
                ingest(Lake(any_root, target_shard_bytes=1024), "t", src, mode="append")
            return listing

        def versions(self, table):
            return self._then_commit(super().versions(table))

        def _used_versions(self, table):
            return self._then_commit(super()._used_versions(table))

    lake = Racing(any_root)
    Racing.armed = True
    assert lake.check_log("t") == [] and not Racing.armed
    assert lake.versions("t") == [1, 2]


def test_verify_names_a_broken_parent_chain(any_root, tmp_path):
    lake = _lake_with_versions(any_root, tmp_path, 2)
    key = "t/_log/00000002.json"
    record = json.loads(lake.storage.read(key))  # a writer's bug (the record is sealed as written), not an edit
    lake.storage.write(key, records.encode(records.seal({**record, "parent": None})))
    problems = [str(p) for p in lake.verify(content=False)]
    assert problems == [f"t@2: {lake.storage.describe(key)}: broken chain: parent is none, not version 1"]


# -- publishing records ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_records_are_readable_like_data_and_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        lake = _lake_with_versions(tmp_path / "lake", tmp_path, 1)
    finally:
        os.umask(old)
    record = lake.root / "t" / "_log" / "00000001.json"
    data = next(p for p in (lake.root / "t" / "data").rglob("*") if p.is_file())
    assert record.stat().st_mode & 0o777 == mode == data.stat().st_mode & 0o777


def test_without_hard_links_publishing_falls_back_to_an_exclusive_create(tmp_path, monkeypatch):
    def no_links(src, dst, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    assert publish_new(tmp_path / "r.json", b"first") is True
    assert publish_new(tmp_path / "r.json", b"second") is False  # still exclusive: never overwritten
    assert (tmp_path / "r.json").read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["r.json"]
    lake = _lake_with_versions(tmp_path / "lake", tmp_path, 2)  # a whole lake works without hard links
    assert lake.versions("t") == [1, 2] and lake.verify() == []


@pytest.fixture
def synced(monkeypatch) -> list[str]:
    """The paths os.fsync is called on, in order (the real fsync still runs)."""
    paths = []
    real = os.fsync

    def spy(fd):
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    return paths


def test_a_tables_first_commit_fsyncs_its_log_and_the_directories_above(tmp_path, synced):
    root = tmp_path / "lake"
    _lake_with_versions(root, tmp_path, 1)
    for d in (root, root / "t", root / "t" / "_log"):
        assert str(d) in synced, d
    # the log directory is synced after the record is linked (the temp file was synced before)
    log = str(root / "t" / "_log")
    assert max(i for i, p in enumerate(synced) if p == log) > min(i for i, p in enumerate(synced) if "/.commit-" in p)


def test_a_commit_fsyncs_every_file_and_directory_of_its_data_once(tmp_path, synced):
    root = tmp_path / "lake"
    _lake_with_versions(root, tmp_path, 1)
    data = [p for p in (root / "t" / "data").rglob("*") if "_leases" not in p.parts]
    arrays = {p.parent for p in data if p.name == "zarr.json"}
    assert arrays and all(p.is_dir() for p in arrays)
    for p in data:
        if p.is_dir():
            assert str(p) in synced, p  # its entries (files, sub-directories) survive a crash
        if any(a == p or a in p.parents for a in arrays):
            assert p.is_dir() or str(p) in synced, p  # an array's files: by its writer, when complete
            assert synced.count(str(p)) == 1, (p, synced.count(str(p)))  # and only once


def test_lake_ls_lists_every_readable_version_and_names_the_unreadable(tmp_path, capsys):
    lake = _lake_with_versions(tmp_path / "lake", tmp_path, 3)
    path = lake.root / "t" / "_log" / "00000002.json"
    path.chmod(0o644)
    path.write_text("{not json")
    assert main(["lake", "ls", "--lake", str(lake.root)]) == 2
    out = capsys.readouterr()
    lines = out.out.splitlines()
    assert lines[0].startswith("t@1 ") and lines[2].startswith("t@3 ")
    assert lines[1].startswith("UNREADABLE t@2: commit record") and len(lines) == 3
    err = out.err.strip().splitlines()
    assert len(err) == 1 and "t@2" in err[0]
    path.write_text("[]")  # valid JSON, not a record; and the table named explicitly, its latest record bad
    (lake.root / "t" / "_log" / "00000003.json").write_text("{}")
    assert main(["lake", "ls", "--lake", str(lake.root), "--table", "t"]) == 2
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("t@1 ") and [x[:16] for x in lines[1:]] == ["UNREADABLE t@2: ", "UNREADABLE t@3: "]


# -- lake roots ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("uri", ["memory://lake", "ftp://host/lake", "s3:lake", "gcs:lake"])
def test_unsupported_lake_uris_are_refused_and_nothing_is_created(tmp_path, monkeypatch, capsys, uri):
    monkeypatch.chdir(tmp_path)
    argv = ["--table", "t", "--source", "sklearn:iris"]
    for command in (["lake", "ingest", "--lake", uri, *argv], ["lake", "ls", "--lake", uri],
                    ["registry", "ls", "--lake", uri]):
        assert main(command) == 2
        line = _one_error_line(capsys)
        assert "is not supported" in line and "local directory" in line
    assert list(tmp_path.iterdir()) == []


def test_a_file_uri_is_a_local_lake(tmp_path):
    _lake_with_versions(tmp_path / "lake", tmp_path, 1)
    assert Lake(f"file://{tmp_path / 'lake'}").versions("t") == [1]
    with pytest.raises(LakeError, match="absolute path"):
        Lake("file://relative/lake")
    assert Lake(f"./{tmp_path.name}:x").root.name == f"{tmp_path.name}:x"  # a ':' in a relative path is fine


# -- the storage interface -------------------------------------------------------------------------------------------

RACER = """
import sys
from lepton_jax.lake.storage import open_storage
storage = open_storage(sys.argv[1])
sys.stdin.readline()  # all racers start together
print(storage.create("t/_log/00000001.json", sys.argv[2].encode()))
"""


def test_local_storage_create_if_absent_admits_exactly_one_of_many_racing_processes(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), f"writer {k}"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for k in range(6)]
    time.sleep(0.5)
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["False"] * 5 + ["True"], outs
    winner = outs.index("True")
    storage = open_storage(tmp_path)
    assert storage.read("t/_log/00000001.json") == f"writer {winner}".encode()
    assert storage.list("t/_log/") == ["00000001.json"]  # no temp file left behind
    assert storage.list("t/nothing/") == [] and storage.list("") == ["t"]
    with pytest.raises(LakeError, match="invalid lake key"):
        storage.read("t/../../etc/passwd")


def test_a_compaction_that_loses_the_race_to_an_append_publishes_nothing(tmp_path):
    lake = _lake_with_versions(tmp_path / "lake", tmp_path, 2)  # two fragments per split: something to compact
    extra = npz_source(npz_shard(tmp_path / "extra.npz", 5))

    class Racing(Lake):
        def publish(self, *args, **kwargs):
            ingest(Lake(self.root, target_shard_bytes=1024), "t", extra, mode="append")
            return super().publish(*args, **kwargs)

    with pytest.raises(LakeError, match="while it was being compacted"):
        Racing(lake.root).compact("t", retries=3)
    after = Lake(lake.root)
    assert after.versions("t") == [1, 2, 3] and after.table("t").record["lineage"]["mode"] == "append"
    assert after.verify() == [] and len({p.name for p in (lake.root / "t" / "data").iterdir()}) == 3


def test_a_failure_after_the_record_is_created_never_discards_published_data(any_root, tmp_path):
    """The record is the commit point: a failing used-version marker, or a create whose answer is lost (it landed,
    then the call raised), leaves a published version whose data is all there."""
    lake = Lake(any_root)

    def failing_marker(self, table, version):
        raise LakeError("simulated: the marker PUT was refused")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Lake, "_mark_used", failing_marker)
        v1 = ingest(lake, "t", npz_source(npz_shard(tmp_path / "a.npz", 0))).version
    assert lake.versions("t") == [1] and v1.reader("train").read_all()["image"].shape[0] > 0

    real_create = type(lake.storage).create

    def create_then_lose_the_answer(self, key, payload, **kw):
        created = real_create(self, key, payload, **kw)
        if "/_log/" in key and key.endswith(".json"):
            raise LakeError("simulated: the conditional PUT timed out after it landed")
        return created

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(lake.storage), "create", create_then_lose_the_answer)
        v2 = ingest(Lake(any_root), "t", npz_source(npz_shard(tmp_path / "b.npz", 1)), mode="append").version
    assert v2.version == 2 and lake.versions("t") == [1, 2]
    assert v2.reader("train").read_all()["image"].shape[0] > v1.reader("train").read_all()["image"].shape[0]
    assert lake.table("t", 2).reader("test").read_all()["image"].shape[0] > 0


def test_a_held_lease_is_renewed_without_the_writer_calling_touch(tmp_path, monkeypatch):
    """Phases that never call touch() (hashing, the commit tail) keep the lease live: a heartbeat rewrites it."""
    import json as json_

    from lepton_jax.lake import commit, store

    monkeypatch.setattr(commit, "LEASE_HEARTBEAT_SECONDS", 0.05)
    lake = Lake(tmp_path / "lake")
    with lake.lease("t", "c1"):
        key = f"t/{store.LEASE_DIR}/c1.json"
        first = json_.loads(lake.storage.read(key))["time"]
        time.sleep(0.4)
        later = json_.loads(lake.storage.read(key))["time"]
    assert later > first + 0.1
    assert not lake.storage.exists(key)  # released


# -- self-verifying records -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("edit", ["label_names", "num_examples"])
def test_an_edited_record_is_named_by_every_reader_and_by_verify(any_root, tmp_path, capsys, edit):
    """A published record carries the sha256 of its own content: reversing its label names or changing a split's
    example count is an error naming the record for readers, `lake ls` and `lake verify` (exit 2)."""
    lake = _lake_with_versions(any_root, tmp_path, 2)
    key = "t/_log/00000002.json"
    record = json.loads(lake.storage.read(key))
    assert record["format"] == records.FORMAT and record[records.DIGEST_FIELD] == records.record_digest(record)
    if edit == "label_names":
        record["schema"]["label_names"] = record["schema"]["label_names"][::-1]
    else:
        record["splits"]["train"]["num_examples"] = 5
    lake.storage.write(key, json.dumps(record, indent=1, sort_keys=True).encode())
    where = lake.storage.describe(key)
    for read in (lambda: lake.table("t"), lambda: lake.table("t", 2).reader("train").read(0)):
        with pytest.raises(LakeError, match=f"commit record {re.escape(where)} does not match its own digest"):
            read()
    assert lake.table("t", 1).version == 1  # the other versions still read
    assert [p.version for p in lake.verify(content=False)] == [2]
    capsys.readouterr()
    assert main(["lake", "verify", "--lake", str(any_root), "--files-only"]) == 2
    out = capsys.readouterr()
    assert where in out.out + out.err and "does not match its own digest" in out.out + out.err
    assert main(["lake", "ls", "--lake", str(any_root)]) == 2
    assert "could not be read: t@2" in _one_error_line(capsys)


def test_records_of_the_unsealed_format_still_read_and_verify(tmp_path):
    """A lepton-lake/2 record (written before records carried their digest) reads and verifies as before."""
    lake = _lake_with_versions(tmp_path / "lake", tmp_path, 1)
    key = "t/_log/00000001.json"
    record = json.loads(lake.storage.read(key))
    del record[records.DIGEST_FIELD]
    lake.storage.write(key, json.dumps({**record, "format": "lepton-lake/2"}, indent=1, sort_keys=True).encode())
    tv = lake.table("t")
    assert tv.record["format"] == "lepton-lake/2" and len(tv.reader("train").read(np.arange(3))["image"]) == 3
    assert lake.verify() == []
