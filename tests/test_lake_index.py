"""The ingest's on-disk hash index: exact lookups across merged sorted runs, against a dict as the reference."""

from __future__ import annotations

import numpy as np

from lepton_jax.lake.index import CONFLICT, NEW, TABLE, HashIndex, prefix_keys
from lepton_jax.lake.sources import RowIds


def test_index_matches_a_dict_across_merged_runs_and_prefix_collisions(tmp_path):
    rng = np.random.default_rng(0)
    reference: dict[bytes, tuple] = {}
    # tiny runs: entries in memory, many merges on disk, several capped runs
    with HashIndex(tmp_path, max_run=64, memory_run=16) as index:
        for batch in range(12):
            n = int(rng.integers(1, 40))
            hashes = rng.integers(0, 256, size=(n, 32), dtype=np.uint8)
            if batch % 3 == 1:  # same first 8 bytes as earlier hashes, different after: must not match them
                old = np.frombuffer(b"".join(list(reference)[:n]), np.uint8).reshape(-1, 32)
                hashes[:old.shape[0], :8] = old[:, :8]
            labels = rng.integers(0, 5, size=n)
            sources = np.arange(n) + 1000 * batch
            split = ["train", "dev"][batch % 2]
            ids = [f"file{batch}-{i}.png" for i in range(n)] if batch % 3 == 0 else (
                RowIds(f"part{batch}.npz", n) if batch % 3 == 1 else None)
            state = TABLE if batch == 0 else NEW
            # lookups before adding: nothing of this batch is there yet, except what the reference holds
            found = index.lookup(hashes)
            assert [f >= 0 for f in found] == [h.tobytes() in reference for h in hashes]
            index.add(hashes, labels, split, state, batch, np.arange(n), sources, ids,
                      None if ids is None else np.arange(n))
            for i, h in enumerate(hashes):
                ident = ids[i] if ids is not None else f"example {sources[i]}"
                reference[h.tobytes()] = (int(labels[i]), split, state, batch, i, int(sources[i]), ident)
        assert len(index) == len(reference) and len(index._runs) > 3
        everything = np.frombuffer(b"".join(reference), np.uint8).reshape(-1, 32)
        found = index.lookup(everything)
        assert (found >= 0).all()
        assert [tuple(index.record(int(f))) for f in found] == list(reference.values())
        missing = rng.integers(0, 256, size=(50, 32), dtype=np.uint8)
        missing[:, :8] = everything[:50, :8]  # colliding prefixes only
        assert (index.lookup(missing) == -1).all()
        index.mark_conflict(int(found[3]))
        assert index.record(int(found[3])).state == CONFLICT
        counts = dict(index.splits_of())
        expected: dict[str, int] = {}
        for k, v in enumerate(reference.values()):
            if k != 3:
                expected[v[1]] = expected.get(v[1], 0) + 1
        assert counts == expected


def test_hashes_sharing_a_prefix_within_one_run_are_told_apart(tmp_path):
    """Distinct hashes with equal first 8 bytes, in the same run and across merged runs: each lookup finds its own
    record (not the first with that prefix), and an unknown hash with that prefix finds none."""
    rng = np.random.default_rng(5)
    hashes = rng.integers(0, 256, size=(9, 32), dtype=np.uint8)
    hashes[:, :8] = hashes[0, :8]  # all nine share one prefix
    with HashIndex(tmp_path, max_run=64, memory_run=4) as index:
        for start in (0, 3, 6):  # three adds: in memory, then runs on disk merged with it
            part = hashes[start:start + 3]
            assert (index.lookup(part) == -1).all()
            index.add(part, np.arange(3), "train", NEW, start, np.arange(3), np.arange(start, start + 3))
        found = index.lookup(hashes[::-1])
        assert [index.record(int(f)).index for f in found] == list(range(8, -1, -1))
        other = hashes[:1].copy()
        other[0, 31] ^= 1
        assert index.lookup(other)[0] == -1


def test_table_rows_are_looked_up_without_being_copied_to_disk(tmp_path):
    """An append's index holds the table's rows (add_table) as the arrays it is given: lookups, records, conflicts
    and split counts work as for added records, and nothing of them is written to the index's files."""
    rng = np.random.default_rng(5)
    table = [rng.integers(0, 256, (n, 32), dtype=np.uint8) for n in (300, 200)]
    with HashIndex(tmp_path) as index:
        index.add_table(table[0], np.arange(300) % 3, "train")
        index.add_table(table[1], np.full(200, 7), "test")
        assert sum(f.stat().st_size for f in index.path.iterdir()) == 0 and len(index) == 500
        new = rng.integers(0, 256, (10, 32), dtype=np.uint8)
        index.add(new, np.zeros(10), "train", NEW, 0, np.arange(10), np.arange(10))
        probe = np.concatenate([table[1][[5]], table[0][[299]], new[[3]], rng.integers(0, 256, (1, 32),
                                                                                       dtype=np.uint8)])
        found = index.lookup(probe)
        assert found[3] == -1
        hits = [index.record(int(f)) for f in found[:3]]
        assert [(h.label, h.split, h.state) for h in hits] == [(7, "test", TABLE), (2, "train", TABLE),
                                                               (0, "train", NEW)]
        index.mark_conflict(int(found[0]))
        assert index.record(int(found[0])).state == CONFLICT
        assert dict(index.splits_of()) == {"train": 310, "test": 199}


def test_table_rows_held_by_their_keys_load_a_fragment_only_on_a_match_and_a_prefix_collision_is_not_a_duplicate(
        tmp_path):
    """add_table_keys holds 8 bytes per table row; a fragment's full hashes are loaded only when a lookup matches
    one of its keys, and a different hash sharing those 8 bytes (a prefix collision) is not found: the check stays
    exact."""
    rng = np.random.default_rng(6)
    frags = [rng.integers(0, 256, (n, 32), dtype=np.uint8) for n in (100, 50)]
    loaded = []

    def loader(k):
        def load():
            loaded.append(k)
            return frags[k], np.full(frags[k].shape[0], k)
        return load

    with HashIndex(tmp_path) as index:
        for k, split in ((0, "train"), (1, "test")):
            index.add_table_keys(prefix_keys(frags[k]), split, loader(k))
        miss = rng.integers(0, 256, (5, 32), dtype=np.uint8)
        assert (index.lookup(miss) == -1).all() and loaded == []  # no key matched: nothing loaded
        collision = frags[1][[7]].copy()
        collision[0, 20] ^= 0xFF  # the same first 8 bytes, another hash
        assert index.lookup(collision)[0] == -1 and loaded == [1]  # loaded to compare, and not a duplicate
        found = index.lookup(frags[1][[7]])
        hit = index.record(int(found[0]))
        assert (hit.label, hit.split, hit.state) == (1, "test", TABLE) and loaded == [1]  # loaded once
        both = index.lookup(np.concatenate([collision, frags[1][[7]], frags[0][[3]]]))  # one key, two probes
        assert both[0] == -1 and both[1] == found[0] and index.record(int(both[2])).label == 0
        frags.append(rng.integers(0, 256, (20, 32), dtype=np.uint8))
        index.add_table_keys(prefix_keys(frags[2]), "train", loader(2))  # a fragment added after lookups
        assert index.record(int(index.lookup(frags[2][[19]])[0])).label == 2
        assert dict(index.splits_of()) == {"train": 120, "test": 50}


def test_table_lookups_are_exact_whether_they_scan_the_table_keys_or_sort_them(tmp_path):
    """The first lookups scan the table's keys through a bitmap of the probes' low bits, later ones sort them
    (``SCANS_BEFORE_SORT``): both find exactly the table's rows, whatever shares a key's low bits (bitmap false
    positives) or its whole 8-byte prefix (a collision)."""
    from lepton_jax.lake.index import SCAN_BITS, SCANS_BEFORE_SORT

    rng = np.random.default_rng(11)
    frags = [rng.integers(0, 256, (n, 32), dtype=np.uint8) for n in (300, 200)]
    where = {frags[k][i].tobytes(): (k, i) for k in range(2) for i in range(len(frags[k]))}
    with HashIndex(tmp_path) as index:
        for k in range(2):
            index.add_table_keys(prefix_keys(frags[k]), "train", lambda k=k: (frags[k], np.full(len(frags[k]), k)))
        for lookup in range(SCANS_BEFORE_SORT + 3):
            hits = frags[lookup % 2][rng.choice(len(frags[lookup % 2]), 8, replace=False)]
            low_bits = hits.copy()  # same low SCAN_BITS bits of the key (its last bytes), another key
            low_bits[:, 8 - (SCAN_BITS + 7) // 8 - 1] ^= 0x5A
            prefix = hits.copy()  # same 8-byte key, another hash
            prefix[:, 31] ^= 0x01
            probes = np.concatenate([hits, low_bits, prefix, rng.integers(0, 256, (8, 32), dtype=np.uint8)])
            got = index.lookup(probes)
            assert (got[8:] == -1).all(), lookup
            for probe, number in zip(hits, got[:8], strict=True):
                k, _ = where[probe.tobytes()]
                assert number >= 0 and index.record(int(number)).label == k, lookup
        assert index._table_sorted is not None  # the later lookups took the sorted path
