"""Regenerate data/quadratic.csv: y = 1.5 x^2 - 0.8 x + 0.2 + noise, seeded.

python data/make_quadratic_csv.py [--rows 200] [--seed 0] [--out data/quadratic.csv]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd


def make_frame(rows: int = 200, seed: int = 0, noise: float = 0.05) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 1.0, rows)
    y = 1.5 * x**2 - 0.8 * x + 0.2 + rng.normal(0.0, noise, rows)
    return pd.DataFrame({"x": x.round(6), "y": y.round(6)})


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("quadratic.csv"))
    args = parser.parse_args()
    make_frame(args.rows, args.seed).to_csv(args.out, index=False)
    print(f"wrote {args.out}")
