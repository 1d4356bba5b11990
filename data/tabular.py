"""Reading numeric CSV columns with pandas, with one-line errors that name file, row and column."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import UserError, quote

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
# A line of a CSV of numbers is short; pandas spent minutes (and memory) on a 1 GiB single
# line, so longer lines are refused first, reading the file a block at a time.
MAX_LINE_BYTES = 1 << 20


def read_numeric_columns(path: Path | str, columns: list[str]) -> dict[str, torch.Tensor]:
    """The named columns as float32 tensors; any failure is one line naming file, row and column."""
    frame = read_table(path, columns)
    return {col: to_numbers(frame, col, path) for col in columns}


def read_table(path: Path | str, columns: list[str]):
    """The CSV as a pandas DataFrame of text cells (stripped), with `columns` present. Every
    failure is one line naming the file: missing, empty, header only, ragged rows, missing
    columns."""
    import pandas as pd  # lazy: the default run does not read CSVs

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: CSV file not found (expected a file with columns {columns})")
    if not path.is_file():
        raise UserError(f"{path}: is not a file (expected a CSV file with columns {columns})")
    try:
        _check_line_lengths(path)
        # dtype=str: read the text as it is, so a bad cell can be quoted in the error.
        frame = pd.read_csv(path, skipinitialspace=True, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: CSV file is empty (expected columns {columns})") from None
    except pd.errors.ParserError as err:  # ragged rows: "Expected 2 fields in line 4, saw 3"
        first = str(err).strip().splitlines()[0].removeprefix("Error tokenizing data. C error: ")
        raise UserError(f"{path}: not a well-formed CSV ({first[:100]})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text CSV file (undecodable bytes)") from None
    except OSError as err:
        raise UserError(f"{path}: cannot read ({err.strerror or err})") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        found = [quote(c, 20) for c in frame.columns[:5]]  # the header may be anything
        if len(frame.columns) > 5:
            found.append(f"... {len(frame.columns) - 5} more")
        raise UserError(f"{path}: missing column(s) {missing}; found [{', '.join(found)}]")
    if frame.empty:
        raise UserError(f"{path}: CSV has a header but no data rows")
    return frame.apply(lambda column: column.astype(str).str.strip())


def to_numbers(frame, col: str, path: Path | str) -> torch.Tensor:
    """Column `col` of read_table's frame as float32; a missing, text, NaN, infinite or
    out-of-float32 cell is one line naming the file, data row (from 1), file line and column."""
    import pandas as pd

    text = frame[col]
    values = pd.to_numeric(text, errors="coerce")
    # Beyond float32's range a finite text value (1e39) would become inf in the tensor.
    bad = values.isna() | ~values.abs().le(FLOAT32_MAX)
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        cell = text.iloc[row]
        what = "an empty cell (or a short row)" if cell == "" else quote(cell)
        limit = (
            " within float32 range (|x| <= 3.4e38)"
            if values.iloc[row] == values.iloc[row] and abs(values.iloc[row]) < float("inf")
            else ""
        )
        raise UserError(
            f"{path}: data row {row + 1} (line {_line_of(Path(path), row)}), column "
            f"{col!r}: expected a finite number{limit}, got {what}"
        )
    return torch.tensor(values.to_numpy(dtype="float64"), dtype=torch.float32)


def _check_line_lengths(path: Path) -> None:
    """Refuse a line longer than MAX_LINE_BYTES, in blocks of that size (bounded memory, and
    a 1 GiB single line is refused after 2 MiB). A line inside one block is shorter than a
    block, so only the lines that cross a block's start need measuring."""
    line, last_newline, offset = 1, -1, 0
    with open(path, "rb") as file:
        while block := file.read(MAX_LINE_BYTES):
            first = block.find(b"\n")
            end = offset + (first if first >= 0 else len(block))  # where that line ends
            if end - last_newline - 1 > MAX_LINE_BYTES:
                raise UserError(f"{path}: line {line} is longer than {MAX_LINE_BYTES >> 20} MiB; not a CSV of numbers")
            if first >= 0:
                line += block.count(b"\n")
                last_newline = offset + block.rfind(b"\n")
            offset += len(block)


def _line_of(path: Path, row: int) -> int:
    """File line (from 1) of data row `row` (from 0): the header and blank lines skipped."""
    seen = -1  # the header is the first non-blank line
    with open(path, encoding="utf-8", errors="replace") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                if seen == row:
                    return number
                seen += 1
    return row + 2


def read_feature_csv(path: Path | str, columns: list[str]) -> tuple[dict[str, list[str]], torch.Tensor]:
    """predict.py's input: the file's columns as they are (kept in its output) and an
    (N, len(columns)) float tensor of the feature columns."""
    frame = read_table(path, columns)
    x = torch.stack([to_numbers(frame, c, path) for c in columns], dim=1)
    return {c: frame[c].tolist() for c in frame.columns}, x
