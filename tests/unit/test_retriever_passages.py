"""The SQLite passage store: versions, rollback, lookups."""

from services.retriever.passages import Passage, PassageStore


def p(pid, position=0, text="t", **metadata):
    return Passage(pid, pid.split("#")[0], position, "", text, metadata)


def test_versions_and_recover(tmp_path):
    store = PassageStore(tmp_path, 0)
    rows = store.stage(1, [p("a#0"), p("a#1", 1), p("b#0", lang="en")], [])
    assert [r for r, _ in rows] == [1, 2, 3]
    assert store.count(0) == 0 and store.count(1) == 3
    # Version 2 upserts a#0 and deletes b#0; readers at version 1 still see the old rows.
    old = store.rowids_of_ids(1, ["a#0", "b#0"])
    store.stage(2, [p("a#0", text="new")], old.values())
    assert store.by_rowids(1, [1])[1].text == "t"
    assert store.by_rowids(2, [4])[4].text == "new"
    assert store.count(1) == 3 and store.count(2) == 2
    # A writer that died before committing version 2: reopening at version 1 rolls it back.
    store.close()
    store = PassageStore(tmp_path, 1)
    assert store.count(1) == 3
    assert store.rowids_of_ids(1, ["a#0", "b#0"]) == old
    assert store.by_rowids(2, [4]) == {}


def test_lookups(tmp_path):
    store = PassageStore(tmp_path, 0)
    store.stage(1, [p("a#0"), p("a#1", 1, lang="en"), p("b#0", lang="en", kind="x"), p("c#0", lang="de")], [])
    assert store.rowids_matching(1, {"lang": "en"}) == {2, 3}
    assert store.rowids_matching(1, {"lang": "en", "kind": "x"}) == {3}
    assert store.rowids_matching(1, {"lang": "fr"}) == set()
    assert store.continuation(1, store.by_rowids(1, [1])[1]).id == "a#1"
    assert store.continuation(1, store.by_rowids(1, [2])[2]) is None
    assert sorted(store.rowids_of_docs(1, ["a"])) == [1, 2]
    assert store.count_documents(1) == 3
    store.stage(2, [], [1])
    store.purge(before=2)
    assert store.count(2) == 3 and store.by_rowids(1, [1]) == {}
