"""Document readers: txt / jsonl(.gz) / parquet files and directories, and their user errors."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.data.readers import expand_inputs, read_documents
from lmforge.errors import DataError

PROSE = (
    "The interpreter reads a line.\n"
    "It then executes it.\n"
    "\n"
    "\n"
    "Exceptions propagate up the stack.\n"
    "   \n"
    "A handler may catch them.\n"
    "Or not.\n"
)


def read_all(*inputs, **kwargs) -> list[str]:
    return list(read_documents(expand_inputs(list(inputs)), **kwargs))


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_txt_file_split_yields_the_whole_file_verbatim(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(PROSE, encoding="utf-8")
    assert read_all(path) == [PROSE]


def test_txt_paragraph_split_breaks_on_blank_lines(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(PROSE, encoding="utf-8")
    assert read_all(path, text_split="paragraph") == [
        "The interpreter reads a line.\nIt then executes it.",
        "Exceptions propagate up the stack.",
        "A handler may catch them.\nOr not.",
    ]


def test_txt_line_split_yields_each_non_blank_line(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text(PROSE, encoding="utf-8")
    assert read_all(path, text_split="line") == [
        "The interpreter reads a line.",
        "It then executes it.",
        "Exceptions propagate up the stack.",
        "A handler may catch them.",
        "Or not.",
    ]


def test_gzipped_txt_reads_like_plain_txt(tmp_path):
    path = tmp_path / "doc.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(PROSE)
    assert read_all(path, text_split="line") == read_all(
        _write(tmp_path / "plain.txt", PROSE), text_split="line"
    )


def test_jsonl_yields_the_text_field_of_each_record_skipping_blank_lines(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(
        json.dumps({"id": "a", "text": "first ünïcode doc\nwith two lines"})
        + "\n\n"
        + json.dumps({"id": "b", "text": "second 😀"})
        + "\n",
        encoding="utf-8",
    )
    assert read_all(path) == ["first ünïcode doc\nwith two lines", "second 😀"]


def test_jsonl_reads_a_custom_text_field(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"body": "one"}, {"body": "two"}])
    assert read_all(path, text_field="body") == ["one", "two"]


def test_jsonl_gz_reads_the_same_documents_as_jsonl(tmp_path, corpus_subset, corpus_texts):
    packed = tmp_path / "docs.jsonl.gz"
    with gzip.open(packed, "wb") as f:
        f.write(corpus_subset.read_bytes())
    assert read_all(packed) == read_all(corpus_subset) == corpus_texts


def test_parquet_yields_the_text_column_and_skips_nulls(tmp_path):
    path = tmp_path / "docs.parquet"
    table = pa.table({"id": [1, 2, 3, 4], "text": ["alpha", None, "gamma ✓", "delta\nline"]})
    pq.write_table(table, path, row_group_size=2)
    assert read_all(path) == ["alpha", "gamma ✓", "delta\nline"]


def test_parquet_without_the_text_column_names_file_and_column(tmp_path):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(DataError, match=r"docs\.parquet.*'text'"):
        read_all(path)


def test_a_corrupt_parquet_file_is_a_data_error_naming_it(tmp_path):
    path = _write(tmp_path / "broken.parquet", "definitely not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet"):
        read_all(path)


def test_directories_are_searched_recursively_in_sorted_order_ignoring_other_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deeper").mkdir(parents=True)
    _write(root / "c.txt", "from c")
    _write(root / "a.txt", "from a")
    _write(root / "b" / "deeper" / "x.txt", "from b/deeper/x")
    write_jsonl(root / "b" / "y.jsonl", [{"text": "from b/y"}])
    _write(root / "README.md", "not a supported file")
    _write(root / "notes.csv", "also, not, supported")
    files = expand_inputs([root])
    assert [p.relative_to(root).as_posix() for p in files] == [
        "a.txt",
        "b/deeper/x.txt",
        "b/y.jsonl",
        "c.txt",
    ]
    assert list(read_documents(files)) == ["from a", "from b/deeper/x", "from b/y", "from c"]


def test_inputs_keep_the_order_given_with_directories_expanded_in_place(tmp_path):
    (tmp_path / "dir").mkdir()
    _write(tmp_path / "dir" / "b.txt", "b")
    _write(tmp_path / "dir" / "a.txt", "a")
    _write(tmp_path / "z.txt", "z")
    assert read_all(tmp_path / "z.txt", tmp_path / "dir") == ["z", "a", "b"]


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "also ok"}\n{"text": broken\n', encoding="utf-8")
    documents = read_documents(expand_inputs([path]))
    assert next(documents) == "ok"
    assert next(documents) == "also ok"
    with pytest.raises(DataError, match=r"docs\.jsonl:3: malformed JSON"):
        next(documents)


def test_a_record_without_the_text_field_names_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": "ok"}, {"content": "wrong key"}])
    with pytest.raises(DataError, match=r"docs\.jsonl:2: record has no 'text' field"):
        read_all(path)


@pytest.mark.parametrize("record", [["a", "list"], "a bare string", 42])
def test_a_record_that_is_not_an_object_is_a_data_error(tmp_path, record):
    path = write_jsonl(tmp_path / "docs.jsonl", [record])
    with pytest.raises(DataError, match=r"docs\.jsonl:1"):
        read_all(path)


def test_a_non_string_text_field_is_a_data_error(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [{"text": ["not", "a", "string"]}])
    with pytest.raises(DataError, match=r"docs\.jsonl:1: field 'text' is not a string"):
        read_all(path)


def test_a_missing_input_path_names_it(tmp_path):
    with pytest.raises(DataError, match=r"input not found: .*absent\.jsonl"):
        expand_inputs([tmp_path / "absent.jsonl"])


def test_no_inputs_is_a_data_error():
    with pytest.raises(DataError, match="no input files"):
        expand_inputs([])


def test_an_unsupported_suffix_names_the_file(tmp_path):
    path = _write(tmp_path / "table.csv", "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"unsupported file type: .*table\.csv"):
        expand_inputs([path])


def test_a_directory_without_supported_files_names_it(tmp_path):
    (tmp_path / "only_docs").mkdir()
    _write(tmp_path / "only_docs" / "notes.md", "markdown is not read")
    with pytest.raises(DataError, match="no supported files .* under .*only_docs"):
        expand_inputs([tmp_path / "only_docs"])


@pytest.mark.parametrize("name", ["latin1.txt", "latin1.jsonl"])
def test_non_utf8_text_is_a_data_error_naming_the_file(tmp_path, name):
    path = tmp_path / name
    path.write_bytes('{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: not valid UTF-8"):
        read_all(path)


def test_a_corrupt_gzip_file_is_a_data_error_naming_it(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(b"this was never gzipped\n")
    with pytest.raises(DataError, match=r"cannot read .*docs\.jsonl\.gz"):
        read_all(path)


@pytest.mark.parametrize("values", [[1, 2], [b"raw", b"bytes"]], ids=["int", "binary"])
def test_a_parquet_text_column_that_is_not_strings_is_a_data_error_naming_it(tmp_path, values):
    path = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": values}), path)
    with pytest.raises(DataError, match=r"docs\.parquet.*'text'"):
        read_all(path)


def test_a_json_string_with_a_lone_surrogate_is_a_data_error_naming_file_and_line(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "half an emoji \\ud83d here"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"docs\.jsonl:2"):
        read_all(path)


def test_a_corrupt_zst_file_is_a_data_error_naming_it_not_a_crash(tmp_path):
    from lmforge.data.readers import load_records

    corrupt = tmp_path / "shard.jsonl.zst"
    corrupt.write_bytes(b'{"text": "not compressed at all"}\n')
    with pytest.raises(DataError, match="cannot read .*shard.jsonl.zst: zstd decompress error"):
        list(read_documents([corrupt]))  # tokenize, tokenizer train, eval --data
    with pytest.raises(DataError, match="shard.jsonl.zst: unreadable"):
        load_records(corrupt)  # eval --tasks, sft/dpo data
