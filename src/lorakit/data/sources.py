"""Read rows from files, folders and hub datasets, each tagged with where it came from.

Every row travels with a `where` string ("train.jsonl line 12", "data.parquet row 7") so a
problem found much later (a missing field, an overlong example) can still point the user
at the exact place to fix.  Text formats are parsed by hand, line by line, for that reason:
`datasets.load_dataset("json", ...)` would lose the line numbers and turn a bad line into a
pyarrow traceback.  Columnar sources (Parquet, `datasets` folders, hub datasets) have no
lines; their rows are named by 0-based index, as `ds[i]` / `df.iloc[i]` address them.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any, Iterator

from lorakit.errors import DataError

Row = dict[str, Any]

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_UTF8_HINT = "re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 IN > OUT`)"


def read_rows(spec: str, split: str = "train") -> Iterator[tuple[Row, str]]:
    """Yield (row, where) from a file, a folder or a hub dataset id (optionally 'hub:ID').

    `split` selects the split of a `datasets` folder holding several splits, or of a hub
    dataset; plain files have none.
    """
    spec = str(spec)
    if spec.startswith("hub:"):
        yield from _read_hub(spec[4:], split)
        return
    path = Path(spec).expanduser()
    if path.is_file():
        yield from read_file(path)
    elif path.is_dir():
        yield from _read_folder(path, split)
    elif _HUB_ID.match(spec) and not spec.lower().endswith(SUFFIXES):
        yield from _read_hub(spec, split)
    else:
        raise DataError(
            "file or folder not found",
            hint="check the path in data.train / data.validation; relative paths are resolved "
            "against the config file's folder",
            where=spec,
        )


def read_file(path: Path) -> Iterator[tuple[Row, str]]:
    """Dispatch one file on its suffix."""
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json,
               ".csv": _read_csv, ".parquet": _read_parquet}
    if suffix not in readers:
        raise DataError(
            f"unsupported file type '{suffix or '(none)'}'",
            hint=f"use one of {', '.join(SUFFIXES)} (JSON Lines: one JSON object per line)",
            where=str(path),
        )
    if path.stat().st_size == 0:
        raise DataError("the file is empty", hint="add rows or remove the file from the config", where=str(path))
    yield from readers[suffix](path)


# --------------------------------------------------------------------------- text formats


def _decode(raw: bytes, name: str, line_offset: int = 0) -> str:
    """UTF-8 decode with the failing line named (a BOM is tolerated)."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = line_offset + raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"not UTF-8 text (byte 0x{raw[e.start]:02x} at line {line})", hint=_UTF8_HINT, where=f"{name} line {line}"
        ) from None


def _read_jsonl(path: Path) -> Iterator[tuple[Row, str]]:
    name = str(path)
    seen = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            text = _decode(raw, name, lineno - 1)
            if not text.strip():
                continue
            where = f"{name} line {lineno}"
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"not valid JSON at column {e.colno}: {e.msg}",
                    hint="each line must hold one complete JSON object, e.g. "
                    '{"instruction": "...", "output": "..."}; look for a missing quote, comma or brace',
                    where=where,
                ) from None
            yield _require_object(row, where), where
            seen += 1
    if not seen:
        raise DataError("the file has no rows (only blank lines)", hint="add one JSON object per line", where=name)


def _read_json(path: Path) -> Iterator[tuple[Row, str]]:
    """A JSON array of objects, or {"data": [...]}; rows are named by the line they start on."""
    name = str(path)
    text = _decode(path.read_bytes(), name)
    try:
        json.loads(text)  # one pass for syntax, so a broken file fails before any row is used
    except json.JSONDecodeError as e:
        raise DataError(
            f"not valid JSON at column {e.colno}: {e.msg}",
            hint="fix the syntax (a missing comma, quote or bracket), or use JSON Lines (.jsonl)",
            where=f"{name} line {e.lineno}",
        ) from None
    start = _array_start(text, name)
    count = 0
    for row, pos, lineno in _array_items(text, start):
        where = f"{name} line {lineno}"
        yield _require_object(row, where), where
        count += 1
    if not count:
        raise DataError("the JSON array is empty", hint="add row objects to the array", where=name)


_WS = re.compile(r"\s*")


def _array_start(text: str, name: str) -> int:
    """Index of the '[' of the row array: the top level itself, or the value of "data"."""
    decoder = json.JSONDecoder()
    i = _WS.match(text, 0).end()
    if text.startswith("[", i):
        return i
    if text.startswith("{", i):
        i = _WS.match(text, i + 1).end()
        keys = []
        while not text.startswith("}", i):
            key, i = decoder.raw_decode(text, i)
            i = _WS.match(text, i).end() + 1  # the ':'
            i = _WS.match(text, i).end()
            if key == "data" and text.startswith("[", i):
                return i
            keys.append(key)
            _, i = decoder.raw_decode(text, i)
            i = _WS.match(text, i).end()
            if text.startswith(",", i):
                i = _WS.match(text, i + 1).end()
        raise DataError(
            f"a JSON object without a 'data' array (keys: {', '.join(map(repr, keys)) or 'none'})",
            hint='use a top-level array of rows, or {"data": [rows...]}',
            where=name,
        )
    raise DataError("expected a JSON array of row objects", hint='use [{"instruction": ...}, ...]', where=name)


def _array_items(text: str, start: int) -> Iterator[tuple[Any, int, int]]:
    """Yield (value, offset, line) for each element of the JSON array opening at `start`."""
    decoder = json.JSONDecoder()
    i = _WS.match(text, start + 1).end()
    line, counted = 1 + text.count("\n", 0, i), i
    while not text.startswith("]", i):
        line += text.count("\n", counted, i)
        counted = i
        value, end = decoder.raw_decode(text, i)
        yield value, i, line
        i = _WS.match(text, end).end()
        if text.startswith(",", i):
            i = _WS.match(text, i + 1).end()


def _read_csv(path: Path) -> Iterator[tuple[Row, str]]:
    """CSV with a header line; a row is named by the line it starts on (quoted fields may span lines)."""
    name = str(path)
    reader = csv.reader(io.StringIO(_decode(path.read_bytes(), name), newline=""))
    try:
        header = next(reader, None)
        if header is None or not any(h.strip() for h in header):
            raise DataError("no header line", where=f"{name} line 1",
                            hint="the first line must name the columns, e.g. instruction,input,output")
        header = [h.strip() for h in header]
        start = reader.line_num + 1
        count = 0
        for fields in reader:
            where = f"{name} line {start}"
            start = reader.line_num + 1
            if not any(f.strip() for f in fields):
                continue
            if len(fields) != len(header):
                raise DataError(
                    f"{len(fields)} fields, but the header names {len(header)} ({', '.join(header)})",
                    hint="quote fields that contain commas or line breaks with double quotes",
                    where=where,
                )
            yield dict(zip(header, fields)), where
            count += 1
    except csv.Error as e:
        raise DataError(f"not valid CSV: {e}", hint="check the quoting of this line",
                        where=f"{name} line {reader.line_num}") from None
    if not count:
        raise DataError("the CSV file has a header but no rows", hint="add rows below the header", where=name)


def _require_object(row: Any, where: str) -> Row:
    if not isinstance(row, dict):
        raise DataError(
            f"a row must be a JSON object, got {type(row).__name__}",
            hint='write each row as {"key": value, ...}',
            where=where,
        )
    return row


# --------------------------------------------------------------------------- columnar sources


def _read_parquet(path: Path) -> Iterator[tuple[Row, str]]:
    import pyarrow.parquet as pq

    name = str(path)
    try:
        pfile = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError variants for broken files
        raise DataError(f"not a readable Parquet file: {e}", hint="re-export the file as Parquet", where=name) from None
    index = 0
    for batch in pfile.iter_batches():
        for row in batch.to_pylist():
            yield row, f"{name} row {index}"
            index += 1
    if not index:
        raise DataError("the Parquet file has no rows", hint="add rows or remove the file", where=name)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _read_folder(path: Path, split: str) -> Iterator[tuple[Row, str]]:
    if _is_saved_dataset(path):
        yield from _read_saved(path, split)
        return
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(
            f"the folder holds no data files ({', '.join(SUFFIXES)}) and is not a `datasets` save_to_disk folder",
            hint="point data.train at a data file, or put data files in the folder",
            where=str(path),
        )
    for file in files:
        yield from read_file(file)


def _read_saved(path: Path, split: str) -> Iterator[tuple[Row, str]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for damaged folders
        raise DataError(f"cannot load the `datasets` folder: {e}", hint="re-create it with save_to_disk",
                        where=str(path)) from None
    name = str(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"no split '{split}' (splits: {', '.join(ds)})",
                hint="set data.split to one of these splits",
                where=name,
            )
        ds, name = ds[split], f"{path}[{split}]"
    yield from _indexed(ds, name)


def _read_hub(repo_id: str, split: str) -> Iterator[tuple[Row, str]]:
    import datasets

    try:
        ds = datasets.load_dataset(repo_id, split=split)
    except Exception as e:  # network, missing repo, missing split, gated access: all user-fixable
        raise DataError(
            f"not a local file or folder, and loading it as a hub dataset (split '{split}') failed: "
            f"{type(e).__name__}: {e}",
            hint="check the local path (relative paths are resolved against the config's folder) or the "
            "hub id and data.split; offline, run `datasets.load_dataset(ID).save_to_disk(DIR)` where "
            "there is network and point data.train at DIR",
            where=repo_id,
        ) from None
    yield from _indexed(ds, f"hub:{repo_id}")


def _indexed(ds: Any, name: str) -> Iterator[tuple[Row, str]]:
    count = 0
    for index, row in enumerate(ds):
        yield dict(row), f"{name} row {index}"
        count += 1
    if not count:
        raise DataError("the dataset has no rows", hint="choose another split or dataset", where=name)
