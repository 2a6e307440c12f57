"""Tables (medflow.io): the manifest, clean and split tables are folders of CSV parts, one per source root."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd
import pytest

from medflow.errors import StepError
from medflow.io import TableText, TableWriter, read_csv, table_parts, write_csv, write_table


def _rows(root: str, n: int, start: int = 0) -> pd.DataFrame:
    return pd.DataFrame({"path": [f"{root}/img{i}.png" for i in range(start, start + n)], "root": root,
                         "group": [f"{i:04d}" for i in range(start, start + n)], "label": [i % 2 for i in range(n)]})


def test_a_table_is_a_part_per_root_in_first_appearance_order_and_reads_back(tmp_path: Path) -> None:
    df = pd.concat([_rows("data/inbox/ds/b folder", 2), _rows("@outside", 1), _rows("data/inbox/ds/a", 3)],
                   ignore_index=True)
    write_table(tmp_path / "t", df)
    assert [p.name for p in table_parts(tmp_path / "t")] == ["00000-b_folder.csv", "00001-outside.csv",
                                                             "00002-a.csv"]
    assert read_csv(tmp_path / "t").equals(df)  # order kept, ids keep their zeros
    assert pd.read_csv(table_parts(tmp_path / "t")[2], dtype=str).equals(df[3:].reset_index(drop=True).astype(str))


def test_rows_of_one_root_share_its_part_even_when_chunks_interleave(tmp_path: Path) -> None:
    with TableWriter(tmp_path / "t") as writer:
        for chunk in (_rows("x", 2), _rows("y", 1), _rows("x", 2, start=2)):
            writer.write(chunk)
    assert writer.rows == 5
    assert list(read_csv(tmp_path / "t")["path"]) == ["x/img0.png", "x/img1.png", "x/img2.png", "x/img3.png",
                                                      "y/img0.png"]


def test_a_new_root_adds_a_part_and_leaves_the_others_byte_identical(tmp_path: Path) -> None:
    old = pd.concat([_rows("a", 50), _rows("b", 20)], ignore_index=True)
    write_table(tmp_path / "t", old)
    before = [p.read_bytes() for p in table_parts(tmp_path / "t")]
    write_table(tmp_path / "t", pd.concat([old, _rows("c", 1)], ignore_index=True))
    after = [p.read_bytes() for p in table_parts(tmp_path / "t")]
    assert after[:2] == before and len(after) == 3


def test_text_stream_and_lines_give_one_csv(tmp_path: Path) -> None:
    df = pd.concat([_rows("a", 3), _rows("b", 2)], ignore_index=True)
    write_table(tmp_path / "t", df)
    one = tmp_path / "one.csv"
    write_csv(one, df)
    with TableText(tmp_path / "t") as text:
        chunks = []
        while chunk := text.read(7):
            chunks.append(chunk)
    assert "".join(chunks) == one.read_text()
    with TableText(tmp_path / "t") as text:
        assert list(csv.reader(text)) == list(csv.reader(one.open(newline="")))
    assert read_csv(one).equals(read_csv(tmp_path / "t"))  # a single CSV file is a table of one part


def test_a_part_with_another_header_is_named(tmp_path: Path) -> None:
    write_table(tmp_path / "t", pd.concat([_rows("a", 1), _rows("b", 1)], ignore_index=True))
    second = table_parts(tmp_path / "t")[1]
    second.write_text("path,root\nb/x.png,b\n")
    with pytest.raises(StepError, match=f"{second}: its header differs"):
        read_csv(tmp_path / "t")


def test_an_empty_table_keeps_its_header_and_a_missing_one_is_not_found(tmp_path: Path) -> None:
    write_table(tmp_path / "t", _rows("a", 0))
    assert list(read_csv(tmp_path / "t").columns) == ["path", "root", "group", "label"]
    assert read_csv(tmp_path / "t").empty
    with pytest.raises(FileNotFoundError):
        read_csv(tmp_path / "missing")
    (tmp_path / "bare").mkdir()
    with pytest.raises(StepError, match="bare: a table folder with no .csv part"):
        read_csv(tmp_path / "bare")


def test_a_failed_write_leaves_the_previous_table_whole(tmp_path: Path) -> None:
    write_table(tmp_path / "t", _rows("a", 2))
    before = [p.read_bytes() for p in table_parts(tmp_path / "t")]
    with pytest.raises(RuntimeError), TableWriter(tmp_path / "t") as writer:
        writer.write(_rows("a", 5))
        raise RuntimeError("the step failed half-way")
    assert [p.read_bytes() for p in table_parts(tmp_path / "t")] == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no temporary folder left
    with pytest.raises(ValueError, match="columns"), TableWriter(tmp_path / "t") as writer:
        writer.write(_rows("a", 1))
        writer.write(_rows("a", 1).drop(columns="label"))
    assert [p.read_bytes() for p in table_parts(tmp_path / "t")] == before


def test_a_table_replaces_the_one_csv_at_its_path(tmp_path: Path) -> None:
    write_csv(tmp_path / "t", _rows("a", 2))
    write_table(tmp_path / "t", _rows("a", 3))
    assert len(read_csv(tmp_path / "t")) == 3 and (tmp_path / "t").is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # nothing left beside it


def test_only_the_columns_asked_for_and_an_id_named_after_another_is_its_string(tmp_path: Path) -> None:
    """A singleton's near-duplicate group is its sha256 string, and a unit of one patient that patient's string."""
    df = _rows("a", 3).assign(sha256=["a" * 64, "b" * 64, "c" * 64], dup_group=["a" * 64, "a" * 64, "c" * 64],
                              split_group=["0000", "0000", "0002"])
    write_table(tmp_path / "t", df)
    assert list(read_csv(tmp_path / "t", columns=["path", "label", "not_there"]).columns) == ["path", "label"]
    back = read_csv(tmp_path / "t")
    assert back.equals(df)
    for column, source in (("dup_group", "sha256"), ("split_group", "group")):
        named, own = back[column].array, back[source].array
        assert named[0] is own[0] and named[2] is own[2] and named[1] == own[0], column  # one string, not two


@pytest.mark.parametrize("rows", [0, 1, 2, 3, 5])
def test_a_read_in_chunks_gives_the_frame_one_parse_gives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          rows: int) -> None:
    """Chunks of 2 rows: ``extra`` is blank in the first chunk and text later, ``n`` numbers then text, ``x``
    whole numbers then a decimal; the string columns stay strings whatever a chunk holds."""
    text = "path,source_split,n,extra,x\n" + "".join(
        f"p{i}.png,{'test' if i == 4 else ''},{i if i < 3 else 'n/a'},{'e' if i >= 2 else ''},{i + 0.5 * (i == 4)}\n"
        for i in range(rows))
    (tmp_path / "t.csv").write_text(text)
    whole = pd.read_csv(tmp_path / "t.csv", dtype={"path": str, "source_split": str}, keep_default_na=False,
                        na_values=[""])
    monkeypatch.setattr("medflow.io._READ_CHUNK_ROWS", 2)
    got = read_csv(tmp_path / "t.csv")
    pd.testing.assert_frame_equal(got, whole)
    assert got.dtypes.to_dict() == whole.dtypes.to_dict()
