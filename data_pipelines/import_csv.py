"""CSV/TSV source of `pretrain data import`: rows -> records, every malformed row counted, never merged.

Left to itself, Python's csv reader lets one unbalanced quote (`1.jpg,"12 inch monitor`) swallow every
later row into a single caption without a word, truncates a caption at an unquoted delimiter, and stops
the whole import with a traceback at one non-UTF-8 byte or an over-long field. Here each record is parsed
with strict quoting from a line source that can hand lines out again, so a bad row costs that row
only: a row the parser rejects, a quoted field that runs over following lines which are rows of their own,
a row with more fields than the header, or text that is not UTF-8 is counted as `bad_text` with
`FILE:LINE` in the example, and parsing goes on at the next line. Quoted captions that really span lines
are kept. A header that cannot be read stops the import with the file and line named.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from .import_options import ImportOptions
from .import_sources import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    IMAGE_SUFFIXES,
    Record,
    is_url,
    pick_column,
    resolve_ref,
    safe_key,
)
from .stats import BAD_TEXT, SkipCounter

Line = tuple[int, str]
"""(1-based line number in the file, the line's text with its line ending)."""


class _Records:
    """Records of a CSV file, each with the physical lines it came from; lines handed back are parsed
    again first. One strict reader serves the file (csv resets its state at each record and asks for a
    line only while a record is open, so it reads exactly a record's lines); a new one is made after a
    hand-back, since the old one may have seen the end of the file."""

    def __init__(self, fh: TextIO, fmt: dict) -> None:
        self._fh, self._fmt = fh, fmt
        self._number = 0
        self._again: list[Line] = []
        self._consumed: list[Line] = []
        self._reader = csv.reader(self._feed(), strict=True, **fmt)

    def _feed(self) -> Iterator[str]:
        while True:
            if self._again:
                line = self._again.pop()
            else:
                text = self._fh.readline()
                if not text:
                    return
                self._number += 1
                line = (self._number, text)
            self._consumed.append(line)
            yield line[1]

    def next(self) -> tuple[list[Line], list[str] | None, str]:
        """(lines, fields, "") for the next record, (lines, None, why) for one the strict parser rejects,
        ([], None, "") at the end of the file."""
        self._consumed = []
        try:
            return self._consumed, next(self._reader), ""
        except StopIteration:
            return self._consumed, None, ""
        except csv.Error as exc:
            return self._consumed, None, _explain(str(exc), self._consumed)

    def hand_back(self, lines: list[Line]) -> None:
        self._again.extend(reversed(lines))
        self._reader = csv.reader(self._feed(), strict=True, **self._fmt)


def _explain(error: str, lines: list[Line]) -> str:
    """The csv module's complaint about the record that started on `lines[0]`, in terms of lines."""
    if "unexpected end of data" in error:
        return f"a quote opened on this line is never closed ({error})"
    if len(lines) > 1:
        return (f"a quoted field runs to line {lines[-1][0]}, where the CSV breaks ({error}): an unbalanced "
                "quote?")
    return f"malformed CSV row ({error})"


def _looks_like_row(text: str, fmt: dict, columns: int, image_index: int) -> bool:
    """True when one physical line is a whole row on its own: as many fields as the header and an image
    reference (a URL or a name with an image suffix) in the image column."""
    fields = next(csv.reader([text], **fmt), [])
    if len(fields) < columns:
        return False
    ref = fields[image_index].strip()
    return bool(ref) and not any(c.isspace() for c in ref) and (
        is_url(ref) or ref.lower().endswith(IMAGE_SUFFIXES))


def _not_utf8(value: str) -> str:
    """Why `value` (read with surrogateescape) is not UTF-8, or "" when it is."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        try:
            value.encode("utf-8", "surrogateescape").decode("utf-8")
        except UnicodeDecodeError as exc:
            return str(exc)
    return ""


def csv_records(src: str, opts: ImportOptions, skips: SkipCounter) -> Iterator[Record]:
    """Rows of a CSV/TSV file with a header: image path (relative to the file) or URL, and a caption.

    Keys are the data row's index (`000000000`...) unless `--key-col` names a column; blank lines are no
    rows. Bad rows (module docstring) are counted as `bad_text` on `skips` and keep their index, so the
    keys of good rows do not depend on which other rows are bad."""
    path = Path(src)
    if not path.is_file():
        raise ValueError(f"--from csv: {src} is not a file")
    delimiter = opts.delimiter or ("\t" if path.suffix.lower() in (".tsv", ".tab") else ",")
    if len(delimiter) != 1:
        raise ValueError(f"--delimiter must be one character, got {delimiter!r}")
    fmt = {"delimiter": delimiter}
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        records = _Records(fh, fmt)
        header: list[str] = []
        while not header:
            consumed, fields, error = records.next()
            where = f"{src}:{consumed[0][0] if consumed else 1}"
            if error:
                raise ValueError(f"{where}: cannot read the header row: {error}")
            if fields is None:
                break  # an empty file: pick_column names the missing columns
            header = fields
        bad_header = next((why for why in map(_not_utf8, header) if why), "")
        if bad_header:
            raise ValueError(f"{where}: the header row is not UTF-8 ({bad_header})")
        image_col = pick_column(header, opts.image_col, IMAGE_COLUMNS, "image", src)
        caption_col = pick_column(header, opts.caption_col, CAPTION_COLUMNS, "caption", src)
        if opts.key_col and opts.key_col not in header:
            raise ValueError(f"{src}: no key column {opts.key_col!r}; columns are {', '.join(header)}")
        image_index, caption_index = header.index(image_col), header.index(caption_col)
        key_index = header.index(opts.key_col) if opts.key_col else -1
        index = 0
        while True:
            consumed, fields, error = records.next()
            if not consumed:
                return
            if fields == []:
                continue  # a blank line
            where = f"{src}:{consumed[0][0]}"
            if fields is not None and len(consumed) > 1 and any(
                    _looks_like_row(text, fmt, len(header), image_index) for _, text in consumed[1:]):
                error = (f"a quoted field runs over lines {consumed[1][0]}-{consumed[-1][0]}, which are rows "
                         "of their own (an unbalanced quote?)")
            elif fields is not None and any(f.strip() for f in fields[len(header):]):
                error = (f"{len(fields)} fields, the header has {len(header)} (an unquoted "
                         f"{delimiter!r} in a caption?)")
            if error:
                records.hand_back(consumed[1:])  # only the first line is lost: re-read the others as rows
                skips.skip(BAD_TEXT, f"{where}: {error}")
                index += 1
                continue
            fields += [None] * (len(header) - len(fields))  # short rows: missing columns, as DictReader
            used = [(name, fields[i]) for name, i in (("image", image_index), ("caption", caption_index),
                                                       ("key", key_index)) if i >= 0 and fields[i]]
            bad = next(((name, why) for name, why in ((n, _not_utf8(v)) for n, v in used) if why), None)
            if bad:
                skips.skip(BAD_TEXT, f"{where}: the {bad[0]} column is not UTF-8: {bad[1]}")
                index += 1
                continue
            key = safe_key(fields[key_index] or "") if key_index >= 0 else f"{index:09d}"
            ref = (fields[image_index] or "").strip()
            yield key, resolve_ref(ref, path.parent) if ref else None, fields[caption_index], {}
            index += 1
