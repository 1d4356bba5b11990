"""Reading numeric CSV columns with pandas, with one-line errors that name file, row and column."""

from __future__ import annotations

from pathlib import Path

import torch

from engine.errors import UserError


def read_numeric_columns(path: Path | str, columns: list[str]) -> dict[str, torch.Tensor]:
    import pandas as pd  # lazy: the default run does not read CSVs

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: CSV file not found (expected a file with columns {columns})")
    try:
        frame = pd.read_csv(path, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: CSV file is empty (expected columns {columns})") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0]
        raise UserError(f"{path}: not a readable CSV ({first})") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {missing}; found {list(frame.columns)}")
    if frame.empty:
        raise UserError(f"{path}: CSV has a header but no data rows")
    out = {}
    for col in columns:
        values = pd.to_numeric(frame[col], errors="coerce")
        bad = values.isna()
        if bad.any():
            row = int(bad.idxmax())
            raise UserError(f"{path}: row {row + 2}, column {col!r}: expected a number, "
                            f"got {frame[col].iloc[row]!r}")
        out[col] = torch.tensor(values.to_numpy(), dtype=torch.float32)
    return out


def read_feature_csv(path: Path | str, columns: list[str]) -> tuple[list[str], torch.Tensor]:
    """Feature rows for predict.py: row labels and an (N, len(columns)) float tensor."""
    cols = read_numeric_columns(path, columns)
    x = torch.stack([cols[c] for c in columns], dim=1)
    return [str(i) for i in range(len(x))], x
