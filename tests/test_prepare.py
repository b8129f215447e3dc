"""prepare.py on small hand-written Amazon 2023/2018 and RecBole files: counts, titles, drops, filters, errors,
damaged files, genres as domains, and the output directory check (data.own_output)."""
import gzip
import json
import re
import zlib

import pytest

from data import TEST, TRAIN, VALID, load_dataset
from extras.prepare import convert_amazon, convert_recbole
from helpers import cli, ok, refused
from infra.datasets import Domain, dataset_out, short_title, write_dataset
from infra.files import UserError


def write(path, lines, newline="\n"):
    """Lines are dicts (written as JSON) or raw strings; gzip when the name ends in .gz."""
    text = "".join((json.dumps(x) if isinstance(x, dict) else x) + newline for x in lines)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())


def review(user, item, ts):
    return {"rating": 5.0, "text": "great", "asin": item, "parent_asin": item, "user_id": user, "timestamp": ts}


def meta(item, title):
    return {"main_category": "x", "title": title, "parent_asin": item, "details": {}}


@pytest.fixture
def amazon2023(tmp_path):
    src = tmp_path / "amazon"
    src.mkdir()
    write(src / "Video_Games.jsonl", [review("u1", "g1", 1000), review("u1", "g2", 2000), "not json",
                                      review("u1", "g3", 3000), review("u2", "g1", 1500), review("u1", "g1", 500),
                                      {"user_id": "u2", "parent_asin": "g2", "timestamp": "1700"}])
    write(src / "meta_Video_Games.jsonl.gz", [meta("g1", "Zelda &amp; Link"), meta("g2", "Mario\tKart"),
                                              meta("g3", "Tetris"), meta("g9", "Unused")])
    write(src / "All_Beauty.jsonl.gz", [review("u1", "b1", 4000), review("u3", "b1", 100), review("u3", "b2", 200),
                                        review("u3", "b9", 300), review("u3", "g3", 250)])
    write(src / "meta_All_Beauty.jsonl", [meta("b1", "Soap"), meta("b2", "Soap"), meta("b9", "  "),
                                          meta("g3", "Tetris Soap")])
    return src


def test_amazon2023_two_categories(amazon2023, tmp_path):
    m = convert_amazon(2023, amazon2023, ["Video_Games", "All_Beauty"], tmp_path / "out", downstream=["All_Beauty"])
    assert [(d["key"], d["name"], d["role"], d["items"], d["users"], d["interactions"]) for d in m["domains"]] == [
        ("Video_Games", "Video Games", "pretrain", 3, 2, 4), ("All_Beauty", "All Beauty", "downstream", 3, 2, 4)]
    assert (m["users"], m["items"], m["interactions"]) == (3, 6, 8)  # u1 is one user across both categories
    files = m["report"]["files"]
    assert files[str(amazon2023 / "Video_Games.jsonl")] == {
        "lines": 7, "malformed": 2, "malformed_lines": [3, 7],
        "expected": "a JSON object with non-empty string 'user_id', 'parent_asin' and an integer 'timestamp' within "
                    "+-1e15"}
    assert files[str(amazon2023 / "meta_Video_Games.jsonl.gz")] == {"lines": 4, "malformed": 0, "unused": 1}
    assert m["report"]["dropped"] == {"no_title_items": 1, "no_title_interactions": 1, "duplicates": 1}
    assert m["report"]["renamed_ids"] == 1  # g3 is in both categories
    assert m["report"]["titles"] == {"with_year": 0, "truncated": 0, "numbered": 1}  # Soap (2)

    ds = load_dataset(tmp_path / "out")
    assert ds.item_ids == ["g1", "g2", "g3", "b1", "b2", "g3@All_Beauty"]
    assert ds.titles == ["Zelda & Link", "Mario Kart", "Tetris", "Soap", "Soap (2)", "Tetris Soap"]
    u1 = ds.user_ids.index("u1")
    rows = slice(ds.user_start[u1], ds.user_start[u1 + 1])
    assert [ds.item_ids[i] for i in ds.item[rows]] == ["g1", "g2", "g3", "b1"]
    assert ds.time[rows].tolist() == [500, 2000, 3000, 4000]  # the earliest of the two (u1, g1) reviews is kept
    assert ds.split[rows].tolist() == [TRAIN, VALID, TEST, TRAIN]  # 1 beauty item: no evaluation case there


def test_amazon_strict_names_file_and_line(amazon2023, tmp_path):
    with pytest.raises(UserError, match=r"Video_Games\.jsonl:3: malformed line; expected a JSON object"):
        convert_amazon(2023, amazon2023, ["Video_Games"], tmp_path / "out", strict=True)
    assert not (tmp_path / "out").exists()


def test_amazon_errors(amazon2023, tmp_path):
    with pytest.raises(UserError, match=r"no reviews for category 'Books': expected Books\.jsonl or Books\.jsonl\.gz; "
                                        r"categories present: All_Beauty, Video_Games$"):
        convert_amazon(2023, amazon2023, ["Video_Games", "Books"], tmp_path / "out")
    with pytest.raises(UserError, match=r"--downstream Books: not among the categories Video_Games"):
        convert_amazon(2023, amazon2023, ["Video_Games"], tmp_path / "out", downstream=["Books"])
    with pytest.raises(UserError, match="not a directory"):
        convert_amazon(2023, tmp_path / "nowhere", ["Video_Games"], tmp_path / "out")
    (amazon2023 / "meta_All_Beauty.jsonl").unlink()
    with pytest.raises(UserError, match=r"expected meta_All_Beauty\.jsonl or meta_All_Beauty\.jsonl\.gz"):
        convert_amazon(2023, amazon2023, ["All_Beauty"], tmp_path / "out")


def test_reading_shows_megabytes_read_on_a_terminal_only(tmp_path, capsys, monkeypatch):
    import rich.console

    from extras.prepare import _lines
    path = tmp_path / "lines.txt"
    path.write_text(("y" * 23 + "\n") * 100_000)  # 2.4 MB
    stats = {}
    assert sum(1 for _ in _lines(path, stats, False, progress=True)) == 100_000 == stats["lines"]
    assert capsys.readouterr().err == ""  # pytest's stderr is no terminal: quiet
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    assert sum(1 for _ in _lines(path, stats, False, progress=False)) == 100_000
    assert capsys.readouterr().err == ""  # not asked
    assert sum(1 for _ in _lines(path, stats, False, progress=True)) == 100_000
    last = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().err).strip().splitlines()[-1]  # final frame
    assert last.startswith("read lines.txt (MB) 2/2")


def test_amazon_json_edge_cases(tmp_path):
    """loads()'s verdicts (leading blanks fine, trailing data not), and bytes that are not UTF-8: fatal in an id,
    replaced by U+FFFD (and counted) in a title, harmless elsewhere."""
    src = tmp_path / "amazon"
    src.mkdir()
    (src / "Toys.jsonl").write_bytes(b"\n".join([
        b'  {"user_id": "u1", "parent_asin": "g1", "timestamp": 1}\r', b'{"user_id": "u1", "parent_asin": "g2", '
        b'"timestamp": 2} and more', b'{"user_id": "u\xff", "parent_asin": "g1", "timestamp": 3}',
        b'{"user_id": "u1", "parent_asin": "g3", "timestamp": 4, "text": "\xff"}', b"[1, 2]", b"",
        b'{"user_id": "u\\tx", "parent_asin": "g1", "timestamp": 5}', b'{"user_id": "u1", "parent_asin": "g4", '
        b'"timestamp": 6}']) + b"\n")
    (src / "meta_Toys.jsonl").write_bytes(b'{"parent_asin": "g1", "title": "A"}\n{"parent_asin": "g3", "title": "C"}\n'
                                          b'{"parent_asin": "g4", "title": "D\xff"}\n')
    m = convert_amazon(2023, src, ["Toys"], tmp_path / "out")
    stats = m["report"]["files"][str(src / "Toys.jsonl")]
    assert (stats["lines"], stats["malformed"], stats["malformed_lines"]) == (8, 4, [2, 3, 5, 7])
    assert m["report"]["dropped"] == {"no_title_items": 0, "no_title_interactions": 0, "duplicates": 0}
    assert m["report"]["files"][str(src / "meta_Toys.jsonl")] == {"lines": 3, "malformed": 0, "unused": 0,
                                                                  "repaired_titles": 1}
    ds = load_dataset(tmp_path / "out")
    assert ds.titles == ["A", "C", "D\ufffd"] and ds.time.tolist() == [1, 4, 6]


def test_amazon2018_plain_gz_and_dict_literal_meta(tmp_path):
    src = tmp_path / "amazon"
    src.mkdir()
    r = [{"reviewerID": u, "asin": i, "unixReviewTime": t, "overall": 5.0} for u, i, t in
         [("A", "x1", 30), ("A", "x2", 10), ("B", "x2", 20), ("A", "x3", 20)]]
    write(src / "Books_5.json.gz", r + [{"reviewerID": "B", "asin": "x3", "unixReviewTime": "40"}])
    write(src / "meta_Books.json", [{"asin": "x2", "title": "Dune"}, "{'asin': 'x1', 'title': 'Evil'}",
                                    {"asin": "x3", "title": "Emma", "also_buy": ["x1"]}])
    write(src / "Toys.json", [{"reviewerID": "B", "asin": "t1", "unixReviewTime": 5}])
    write(src / "meta_Toys.json.gz", [{"asin": "t1", "title": "Lego"}])
    m = convert_amazon(2018, src, ["Books", "Toys"], tmp_path / "out")
    files = m["report"]["files"]
    assert files[str(src / "Books_5.json.gz")]["malformed"] == 1
    assert files[str(src / "meta_Books.json")] == {"lines": 3, "malformed": 1, "malformed_lines": [2], "unused": 0,
                                                   "expected": "a JSON object with a non-empty string 'asin'"}
    assert m["report"]["dropped"] == {"no_title_items": 1, "no_title_interactions": 1, "duplicates": 0}
    ds = load_dataset(tmp_path / "out")
    assert ds.titles == ["Dune", "Emma", "Lego"] and ds.user_ids == ["A", "B"]
    assert ds.time.tolist() == [10, 20, 5, 20]
    with pytest.raises(UserError, match=r"categories present: Books, Toys$"):
        convert_amazon(2018, src, ["Games"], tmp_path / "out")


def recbole(tmp_path, inter, item, name="my-data", newline="\r\n"):
    src = tmp_path / name
    src.mkdir()
    write(src / f"{name}.inter", ["user_id:token\titem_id:token\trating:float\ttimestamp:float"] + inter, newline)
    write(src / f"{name}.item", ["item_id:token\tmovie_title:token_seq\trelease_year:token"] + item, newline)
    return src


def test_recbole_crlf_titles_and_malformed(tmp_path):
    src = recbole(tmp_path, ["u1\ti1\t5\t10.0", "u1\ti2\t3\t20", "u1\ti3\t4\t30.0", "u2\ti1\t4\t15", "u2\ti2\t3",
                             "u2\ti4\t4\t25", "u3\ti1\t1\tsoon"],
                  ["i1\tToy Story\t1995", "i2\tBeauty &amp; the Beast\t1991", "i3\tHeat\t1995", "i4\t\t1990",
                   "i5\tUnused\t2000"])
    m = convert_recbole(src, tmp_path / "out")
    assert [(d["key"], d["name"], d["role"], d["items"], d["interactions"]) for d in m["domains"]] == [
        ("my-data", "My Data", "pretrain", 3, 4)]
    assert m["report"]["files"][str(src / "my-data.inter")] == {
        "lines": 8, "malformed": 2, "malformed_lines": [6, 8],
        "expected": "4 tab-separated columns (user_id:token item_id:token rating:float timestamp:float)"}
    assert m["report"]["files"][str(src / "my-data.item")] == {"lines": 6, "malformed": 0, "unused": 1}
    assert m["report"]["dropped"] == {"no_title_items": 1, "no_title_interactions": 1, "duplicates": 0}
    ds = load_dataset(tmp_path / "out")
    assert ds.titles == ["Toy Story", "Beauty & the Beast", "Heat"]
    assert ds.time.tolist() == [10, 20, 30, 15] and ds.split.tolist() == [TRAIN, VALID, TEST, TRAIN]
    with pytest.raises(UserError, match=r"my-data\.inter:6: malformed line; expected 4 tab-separated columns"):
        convert_recbole(src, tmp_path / "out", strict=True)


def test_recbole_fractional_times_title_field_and_domain(tmp_path):
    src = recbole(tmp_path, ["u1\ti1\t5\t1.5", "u1\ti2\t5\t1.25", "u1\ti3\t5\t1.21"],  # 1.25, 1.21: same at 1e1
                  ["i1\tA\t1", "i2\tB\t2", "i3\tC\t3"], name="ml", newline="\n")
    m = convert_recbole(src, tmp_path / "out", domain="movies", title_field="release_year:token")
    assert m["domains"][0]["key"] == "movies" and m["domains"][0]["name"] == "Movies"
    assert m["report"]["timestamps"] == "fractional: scaled by 100 to integers"
    ds = load_dataset(tmp_path / "out")
    assert ds.titles == ["1", "2", "3"] and ds.time.tolist() == [121, 125, 150]
    assert [ds.item_ids[i] for i in ds.item] == ["i3", "i2", "i1"]
    with pytest.raises(UserError, match=r"ml\.item: no column label; columns: item_id, movie_title, release_year$"):
        convert_recbole(src, tmp_path / "out", title_field="label")
    with pytest.raises(UserError, match=r"nope\.inter: not found"):
        convert_recbole(src, tmp_path / "out", name="nope")
    (src / "ml.item").write_text("item_id:token\tyear:token\ni1\t1\n")
    with pytest.raises(UserError, match=r"ml\.item: no title column \(title, movie_title, name, item_name\); "
                                        r"columns: item_id, year; name one with --title-field$"):
        convert_recbole(src, tmp_path / "out")


# 2-core: c and d have one interaction each; once (u3, c) is gone u3 has one, so (u3, a) goes in a second round.
K_CORE = [("u1", "a"), ("u1", "b"), ("u2", "a"), ("u2", "b"), ("u3", "a"), ("u3", "c"), ("u4", "d")]
MIN_LEN = [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "d")]  # min_len 3: u2 and with it d go
# 2-core holds; min_len 3 drops u3 (a, d), so d is left with u4 alone: k-core drops (u4, d), then min_len u4's b, c.
BOTH = [("u1", "a"), ("u1", "b"), ("u1", "c"), ("u2", "a"), ("u2", "b"), ("u2", "c"), ("u3", "a"), ("u3", "d"),
        ("u4", "b"), ("u4", "c"), ("u4", "d")]


def filtered(tmp_path, pairs, **options):
    src = recbole(tmp_path, [f"{u}\t{i}\t1\t{t}" for t, (u, i) in enumerate(pairs)],
                  [f"{i}\t{i.upper()}\t1" for i in "abcd"])
    return convert_recbole(src, tmp_path / "out", **options)


@pytest.mark.parametrize("options, pairs, kept, counted", [
    ({"k_core": 2}, K_CORE, (2, 2, 4), {"k_core_interactions": 3, "k_core_users": 2, "k_core_items": 2}),
    ({"min_len": 3}, MIN_LEN, (1, 3, 3), {"min_len_interactions": 2, "min_len_users": 1, "min_len_items": 1}),
    ({"k_core": 2, "min_len": 3}, BOTH, (2, 3, 6), {"k_core_interactions": 1, "k_core_users": 0,
                                                    "k_core_items": 1, "min_len_interactions": 4, "min_len_users": 2,
                                                    "min_len_items": 0})])
def test_filters(tmp_path, options, pairs, kept, counted):
    m = filtered(tmp_path, pairs, **options)
    assert (m["users"], m["items"], m["interactions"]) == kept
    assert m["report"]["dropped"] == {"no_title_items": 0, "no_title_interactions": 0, "duplicates": 0, **counted}


@pytest.mark.parametrize("options, message", [
    ({"k_core": 3}, r"--k-core 3 removed its last 7 interactions \(7 before"),
    ({"min_len": 3, "k_core": 2}, r"--min-len 3 removed its last 4 ")])  # the 2-core leaves u1 and u2 with 2 each
def test_filter_emptying_a_domain(tmp_path, options, message):
    with pytest.raises(UserError, match=f"domain 'my-data': {message}"):
        filtered(tmp_path, K_CORE, **options)


# --------------------------------------------------------------------------------------------------- the output dir
def test_own_output_replaces_only_its_own_dataset(tmp_path, small):
    dataset_out(tmp_path / "new", overwrite=False)  # absent: fine
    (tmp_path / "empty").mkdir()
    dataset_out(tmp_path / "empty", overwrite=False)  # empty: nothing to lose
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "Books.jsonl").write_text("{}\n")
    for overwrite in (False, True):
        with pytest.raises(UserError, match=r"raw: exists and is not a dataset written by this project \(no valid "
                                            r"manifest\.json\); nothing was changed"):
            dataset_out(raw, overwrite=overwrite)
    (raw / "manifest.json").write_text('{"name": "someone else\'s"}')  # a manifest, but not ours
    with pytest.raises(UserError, match="not a dataset written by this project"):
        dataset_out(raw, overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="exists and is not a directory"):
        dataset_out(tmp_path / "file", overwrite=True)
    with pytest.raises(UserError, match=r"small: a dataset already exists there; pass --overwrite"):
        dataset_out(small.path, overwrite=False)
    dataset_out(small.path, overwrite=True)
    (small.path / "cache").mkdir()  # written by cpt_stream: ours
    dataset_out(small.path, overwrite=True)
    (small.path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match=r"holds 'notes\.txt', which this project did not write there"):
        dataset_out(small.path, overwrite=True)
    with pytest.raises(UserError, match=r"would replace the input .*raw; choose an output outside it"):
        dataset_out(tmp_path, overwrite=True, inputs=[raw])  # the source inside --out
    with pytest.raises(UserError, match="would replace the input"):
        dataset_out(raw, overwrite=True, inputs=[raw])
    with pytest.raises(UserError, match="inside"):  # one rule for every command: no output inside an input
        dataset_out(raw / "prepared", overwrite=False, inputs=[raw])


def test_write_dataset_never_replaces_a_foreign_directory(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "photo.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(UserError, match="not a dataset written by this project"):
        write_dataset(tmp_path / "out", source="test", domains=[Domain("a", "A", "pretrain")],
                      items={"x": ("a", "X")}, interactions=[("u", "x", 1)])
    assert (tmp_path / "out" / "photo.jpg").read_bytes() == b"\xff\xd8"


def test_cli_refuses_out_equal_to_source(amazon2023):
    """Before: exit 0, and the raw review files were gone."""
    before = sorted(p.name for p in amazon2023.iterdir())
    result = cli("prepare", "amazon2023", amazon2023, "--categories", "Video_Games", "--out", amazon2023,
                   "--overwrite")
    refused(result, f"--out {amazon2023}: would replace the input {amazon2023}")
    assert sorted(p.name for p in amazon2023.iterdir()) == before


def test_cli_refuses_a_foreign_out(amazon2023, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("keep me")
    refused(cli("prepare", "amazon2023", amazon2023, "--categories", "Video_Games", "--out", notes,
                         "--overwrite"), "not a dataset written by this project")
    assert [p.name for p in notes.iterdir()] == ["todo.txt"] and (notes / "todo.txt").read_text() == "keep me"


# --------------------------------------------------------------------------------------------------- damaged input
def games(n):
    return [review(f"u{k % 7}", f"g{k % 11}", k) for k in range(n)]


def damaged(tmp_path, cut):
    """Video_Games reviews as a .gz with its compressed bytes cut by `cut`; meta intact."""
    src = tmp_path / "amazon"
    src.mkdir(exist_ok=True)
    write(src / "Video_Games.jsonl.gz", games(3000))
    data = (src / "Video_Games.jsonl.gz").read_bytes()
    (src / "Video_Games.jsonl.gz").write_bytes(cut(data))
    write(src / "meta_Video_Games.jsonl", [meta(f"g{k}", f"Game {k}") for k in range(11)])
    return src, data


def test_truncated_gzip_keeps_the_lines_before_the_cut(tmp_path):
    src, data = damaged(tmp_path, lambda data: data[:len(data) // 2])
    complete = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data[:len(data) // 2]).count(b"\n")
    assert 0 < complete < 3000
    m = convert_amazon(2023, src, ["Video_Games"], tmp_path / "out")
    path = src / "Video_Games.jsonl.gz"
    assert m["report"]["files"][str(path)] == {
        "lines": complete, "malformed": 0,
        "ended_early": f"truncated: the compressed data ends after line {complete:,}; the lines before were used"}
    assert m["interactions"] == len({(f"u{k % 7}", f"g{k % 11}") for k in range(complete)})
    with pytest.raises(UserError, match=rf"Video_Games\.jsonl\.gz: truncated: the compressed data ends after line "
                                        rf"{complete:,}; download it again"):
        convert_amazon(2023, src, ["Video_Games"], tmp_path / "out2", strict=True)


@pytest.mark.parametrize("cut, message", [
    (lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:], r"unreadable after line 3,000 \(CRC check failed"),
    (lambda d: b"not gzip at all\n", r"unreadable after line 0 \(Not a gzipped file"),
    (lambda d: d[:10] + b"\xff" * 20 + d[30:], r"unreadable after line 0 \(Error -3 while decompressing")])
def test_corrupt_gzip_is_one_line(tmp_path, cut, message):
    src, _ = damaged(tmp_path, cut)
    with pytest.raises(UserError, match=rf"Video_Games\.jsonl\.gz: {message}.*expected a complete gzip file"):
        convert_amazon(2023, src, ["Video_Games"], tmp_path / "out")


def test_cli_truncated_gzip_is_one_line(tmp_path):
    """Before: only "Aborted." (click's verdict on the EOFError)."""
    src, _ = damaged(tmp_path, lambda data: data[:2000])
    refused(cli("prepare", "amazon2023", src, "--categories", "Video_Games", "--out", tmp_path / "out",
                         "--strict"), f"{src / 'Video_Games.jsonl.gz'}: truncated: the compressed data ends after line")


@pytest.mark.parametrize("files, message", [
    ({"Video_Games.jsonl.gz": "", "meta_Video_Games.jsonl": "ok"},
     r"Video_Games\.jsonl\.gz: no well-formed interaction; domain 'Video_Games' would be empty"),
    ({"Video_Games.jsonl": "crlf", "meta_Video_Games.jsonl": ""},
     r"domain 'Video_Games': none of its 3 interactions has an item with a title in"),
    ({"Video_Games.jsonl": "crlf"}, r"no item titles for category 'Video_Games': expected meta_Video_Games\.jsonl")])
def test_empty_or_missing_files_are_one_error(tmp_path, files, message):
    src = tmp_path / "amazon"
    src.mkdir()
    for name, kind in files.items():
        write(src / name, {"": [], "ok": [meta("g1", "Zelda")], "crlf": games(3)}[kind], "\r\n")
    with pytest.raises(UserError, match=message):
        convert_amazon(2023, src, ["Video_Games"], tmp_path / "out", strict=True)


def test_many_malformed_lines_are_counted_and_the_first_five_named(tmp_path):
    src = tmp_path / "amazon"
    src.mkdir()
    lines = games(4)
    for n in (2, 4, 5, 7, 8, 9, 12):  # line numbers, 1-based, of 7 bad lines among the 4 good ones
        lines.insert(n - 1, "{broken")
    write(src / "Toys.jsonl", lines)
    write(src / "meta_Toys.jsonl", [meta(f"g{k}", f"Toy {k}") for k in range(4)])
    m = convert_amazon(2023, src, ["Toys"], tmp_path / "out")
    stats = m["report"]["files"][str(src / "Toys.jsonl")]
    assert (stats["lines"], stats["malformed"], stats["malformed_lines"]) == (11, 7, [2, 4, 5, 7, 8])
    result = ok(cli("prepare", "amazon2023", src, "--categories", "Toys", "--out", tmp_path / "cli"))
    assert f"warning: {src / 'Toys.jsonl'}: 7 malformed lines skipped (first: 2, 4, 5, 7, 8); expected a JSON" \
        in " ".join(result.split())


def test_long_titles_are_cut_and_counted(tmp_path):
    assert short_title("abcd " * 10000) == " ".join(["abcd"] * 40)  # 199 characters: cut at the last space
    assert short_title("x" * 300) == "x" * 200 and short_title("y" * 200) == "y" * 200
    src = tmp_path / "amazon"
    src.mkdir()
    write(src / "Toys.jsonl", games(4))
    write(src / "meta_Toys.jsonl", [meta("g0", "word " * 1_000_000), meta("g1", "z" * 250), meta("g2", "z" * 250),
                                    meta("g3", "Short")])  # a 5 MB title
    m = convert_amazon(2023, src, ["Toys"], tmp_path / "out")
    assert m["report"]["titles"] == {"with_year": 0, "truncated": 3, "numbered": 1}
    assert load_dataset(tmp_path / "out").titles == [" ".join(["word"] * 40), "z" * 200, "z" * 200 + " (2)", "Short"]


# --------------------------------------------------------------------------------------------------- genres as domains
GENRES = ["i1\tHamlet\t1948\tDrama", "i2\tHamlet\t1996\tDrama Romance", "i3\tHamlet\t1996\tDrama",
          "i4\tToy Story\t1995\tChildren's Comedy", "i5\tAlien\t1979\tSci-Fi Horror", "i6\tHeat\t1995\t",
          "i7\tBabe\t1995\tChildren's", "i8\tFargo\t1996\tCrime", "i9\tAliens\t\tSci-Fi"]
# u1 watches drama and sci-fi, u2 children's and crime, u3 a bit of everything; i6 (no genre) twice.
WATCHED = [("u1", "i1"), ("u1", "i2"), ("u1", "i3"), ("u1", "i5"), ("u1", "i9"), ("u1", "i6"),
           ("u2", "i4"), ("u2", "i7"), ("u2", "i8"), ("u2", "i6"), ("u3", "i2"), ("u3", "i4"), ("u3", "i5")]


def genres(tmp_path):
    src = tmp_path / "ml"
    src.mkdir()
    write(src / "ml.inter", ["user_id:token\titem_id:token\trating:float\ttimestamp:float"] +
          [f"{u}\t{i}\t4\t{t}" for t, (u, i) in enumerate(WATCHED, 100)])
    write(src / "ml.item", ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"] + GENRES)
    return src


def test_recbole_domains_from_a_genre_field(tmp_path):
    m = convert_recbole(genres(tmp_path), tmp_path / "out", domain_field="class", downstream=["sci-fi"],
                        min_domain_items=2)
    assert [(d["key"], d["name"], d["role"], d["items"], d["users"], d["interactions"]) for d in m["domains"]] == [
        ("drama", "Drama", "pretrain", 3, 2, 4), ("childrens", "Children's", "pretrain", 2, 2, 3),
        ("sci-fi", "Sci-Fi", "downstream", 2, 2, 3), ("other", "Other", "pretrain", 1, 1, 1)]
    assert m["report"]["dropped"] == {"no_domain_items": 1, "no_domain_interactions": 2, "no_title_items": 0,
                                      "no_title_interactions": 0, "duplicates": 0}
    assert m["report"]["merged_into_other"] == {"crime": 1}
    assert m["report"]["titles"] == {"with_year": 3, "truncated": 0, "numbered": 1}
    assert m["source"].endswith(", domains from class")
    ds = load_dataset(tmp_path / "out")
    assert ds.item_ids == ["i1", "i2", "i3", "i4", "i7", "i5", "i9", "i8"]
    assert ds.titles == ["Hamlet (1948)", "Hamlet (1996)", "Hamlet (1996) (2)", "Toy Story", "Babe", "Alien",
                         "Aliens", "Fargo"]


def test_recbole_title_year_and_domain_errors(tmp_path):
    src = genres(tmp_path)
    m = convert_recbole(src, tmp_path / "out", domain_field="class", title_year=True)
    assert m["report"]["titles"] == {"with_year": 7, "truncated": 0, "numbered": 1}  # i6 has no domain, i9 no year
    assert [d["key"] for d in m["domains"]] == ["drama", "childrens", "sci-fi", "crime"]
    assert load_dataset(tmp_path / "out").titles[:3] == ["Hamlet (1948)", "Hamlet (1996)", "Hamlet (1996) (2)"]
    with pytest.raises(UserError, match=r"--downstream crime: not a domain of --domain-field class \(crime merged "
                                        r"into 'other'\); domains: drama, childrens, sci-fi, other$"):
        convert_recbole(src, tmp_path / "o", domain_field="class", min_domain_items=2, downstream=["crime"])
    with pytest.raises(UserError, match="--domain and --domain-field: give one"):
        convert_recbole(src, tmp_path / "o", domain_field="class", domain="movies")
    with pytest.raises(UserError, match=r"ml\.item: no column genre; columns: item_id, movie_title, release_year"):
        convert_recbole(src, tmp_path / "o", domain_field="genre")


def test_recbole_single_domain_counts_year_renames(tmp_path):
    """Before: four "Hamlet"s renamed, report said renamed_items 0."""
    m = convert_recbole(genres(tmp_path), tmp_path / "out", domain="movies")
    assert m["report"]["titles"] == {"with_year": 3, "truncated": 0, "numbered": 1}
    ds = load_dataset(tmp_path / "out")
    assert ds.titles[:3] == ["Hamlet (1948)", "Hamlet (1996)", "Hamlet (1996) (2)"]


def test_amazon2018_domains_from_main_cat(tmp_path):
    """main_cat over two category files: a string, an <img> tag (its alt text), a list, missing; one item in both."""
    src = tmp_path / "amazon"
    src.mkdir()
    r = [{"reviewerID": u, "asin": i, "unixReviewTime": t} for u, i, t in
         [("A", "x1", 1), ("A", "x2", 2), ("B", "x3", 3), ("B", "x4", 4), ("A", "x5", 5)]]
    write(src / "Books.json", r[:3])
    write(src / "Toys.json", r[3:] + [{"reviewerID": "C", "asin": "x1", "unixReviewTime": 6}])
    write(src / "meta_Books.json", [{"asin": "x1", "title": "Dune", "main_cat": "Books"},
                                    {"asin": "x2", "title": "Emma", "main_cat": "Books"},
                                    {"asin": "x3", "title": "Scarf", "main_cat": '<img src="a.png" alt="AMAZON '
                                                                                  'FASHION"/>'}])
    write(src / "meta_Toys.json", [{"asin": "x4", "title": "Lego", "main_cat": ["Toys & Games", "Building"]},
                                   {"asin": "x5", "title": "Kite"}, {"asin": "x1", "title": "Dune (toy)"}])
    m = convert_amazon(2018, src, ["Books", "Toys"], tmp_path / "out", domain_field="main_cat",
                       downstream=["toys-games"])
    assert [(d["key"], d["name"], d["role"], d["items"], d["users"], d["interactions"]) for d in m["domains"]] == [
        ("books", "Books", "pretrain", 2, 2, 3), ("amazon-fashion", "AMAZON FASHION", "pretrain", 1, 1, 1),
        ("toys-games", "Toys & Games", "downstream", 1, 1, 1)]
    assert m["report"]["dropped"] == {"no_domain_items": 1, "no_domain_interactions": 1, "no_title_items": 0,
                                      "no_title_interactions": 0, "duplicates": 0}
    assert load_dataset(tmp_path / "out").titles == ["Dune", "Emma", "Scarf", "Lego"]  # x1: the first title found


def test_a_token_field_of_several_words_is_refused_unless_told_which_rule(tmp_path):
    """Before: `Animation Children's Comedy` typed :token made every combination its own domain without a word."""
    src = genres(tmp_path)
    item = src / "ml.item"
    item.write_text(item.read_text().replace("class:token_seq", "class:token"))
    with pytest.raises(UserError, match=r"ml\.item: --domain-field class is typed :token, but 3 rows hold several "
                                        r"words \(e\.g\. 'Drama Romance'\).*--domain-values first"):
        convert_recbole(src, tmp_path / "out", domain_field="class")
    first = convert_recbole(src, tmp_path / "first", domain_field="class", domain_values="first")
    assert [d["key"] for d in first["domains"]] == ["drama", "childrens", "sci-fi", "crime"]  # as :token_seq
    whole = convert_recbole(src, tmp_path / "whole", domain_field="class", domain_values="whole")
    assert "drama-romance" in [d["key"] for d in whole["domains"]]


def test_duplicate_item_ids_keep_the_first_row_and_are_counted(tmp_path):
    src = recbole(tmp_path, ["u1\ti1\t5\t1", "u1\ti2\t5\t2"], ["i1\tToy Story\t1995", "i2\tHeat\t1995",
                                                               "i1\tToy Story 2\t1999"], name="dup")
    m = convert_recbole(src, tmp_path / "out")
    assert m["report"]["files"][str(src / "dup.item")]["duplicate_ids"] == 1
    assert load_dataset(tmp_path / "out").titles == ["Toy Story", "Heat"]


@pytest.mark.parametrize("option", ["k_core", "min_len", "min_domain_items"])
def test_negative_filters_are_refused(option, amazon2023, tmp_path):
    with pytest.raises(UserError, match=f"--{option.replace('_', '-')} -3: expected 0"):
        convert_amazon(2023, amazon2023, ["Video_Games"], tmp_path / "out", **{option: -3})


def test_timestamps_beyond_any_time_are_malformed_not_reversed(tmp_path):
    """Before: 1e308 was cast to int64's minimum, and the latest item became the earliest."""
    src = recbole(tmp_path, ["u1\ti1\t5\t1e308", "u1\ti2\t5\t2", "u1\ti3\t5\t-1e20", "u1\ti4\t5\t3"],
                  ["i1\tA\t1", "i2\tB\t2", "i3\tC\t3", "i4\tD\t4"], name="big")
    m = convert_recbole(src, tmp_path / "out")
    assert m["report"]["files"][str(src / "big.inter")]["malformed_lines"] == [2, 4]
    assert load_dataset(tmp_path / "out").time.tolist() == [2, 3]
    amazon = tmp_path / "amazon"
    amazon.mkdir()
    write(amazon / "Toys.jsonl", [review("u1", "g1", 10**25), review("u1", "g2", 5), review("u1", "g3", 6)])
    write(amazon / "meta_Toys.jsonl", [meta(f"g{k}", f"Toy {k}") for k in range(1, 4)])
    m = convert_amazon(2023, amazon, ["Toys"], tmp_path / "out2")
    assert m["report"]["files"][str(amazon / "Toys.jsonl")]["malformed"] == 1 and m["interactions"] == 2


def test_control_characters_in_titles_are_replaced_and_counted(tmp_path):
    src = recbole(tmp_path, ["u1\ti1\t5\t1", "u1\ti2\t5\t2"], ["i1\tTi\x00tle\x1b[31m 8\t1", "i2\tPlain\t2"],
                  name="ctl")
    m = convert_recbole(src, tmp_path / "out")
    assert m["report"]["files"][str(src / "ctl.item")]["repaired_titles"] == 1
    assert load_dataset(tmp_path / "out").titles == ["Ti tle [31m 8", "Plain"]
