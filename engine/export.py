"""Deployment export: `model.safetensors` + `config.yaml` in a folder (like Hugging Face's
save_pretrained); the config's data/model/loss sections rebuild the model with
`hydra.utils.instantiate`, no class definition needed. Read back, checked, by engine.checkpoint.

    python -m engine.export checkpoints/digits_cnn/best.pt [OUT_DIR]

`checkpoint.export_pt2=true` adds `model.pt2`: a `torch.export` program, the whole model
without its Python class (the safe stand-in for `torch.save(model, PATH)`), the data config
inside; predict.py/evaluate.py take `ckpt=.../model.pt2` alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from engine.checkpoint import CONFIG, PT2, WEIGHTS, inference_weights, load_checkpoint, quiet_torch
from engine.config import saved_sections
from engine.errors import first_line, one_line, user_error_in
from engine.run_dir import check_export_dir, write_atomic

KEPT = ("data", "model", "loss", "seed")


def export(state_dict: dict[str, torch.Tensor], config: dict[str, Any], out_dir: Path) -> Path:
    """Both files, each written atomically, never into a run folder's own files."""
    from safetensors.torch import save  # lazy: safetensors costs start-up time

    check_export_dir(out_dir)
    keep = {k: config[k] for k in KEPT if k in config}
    weights = save(
        {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        metadata={"format": "pt", "config": json.dumps(keep)},
    )
    write_atomic(out_dir / WEIGHTS, lambda out: out.write(weights), binary=True)
    write_atomic(out_dir / CONFIG, lambda out: out.write(yaml.safe_dump(keep, sort_keys=False)))
    return out_dir


def export_checkpoint(
    source: Path, out_dir: Path | None = None, model: torch.nn.Module | None = None, example: torch.Tensor | None = None
) -> Path:
    """A checkpoint's (EMA when kept) weights and config as an export folder (default: its
    path without .pt, best.pt -> best/); with `model` and an `example` batch, model.pt2 too."""
    ckpt = load_checkpoint(source)
    saved_sections(ckpt.get("config"), source)  # what evaluate.py would refuse is refused
    weights, config = inference_weights(ckpt), ckpt.get("config") or {}
    out_dir = out_dir if out_dir is not None else source.with_suffix("")
    export(weights, config, out_dir)
    if model is not None and example is not None:
        model.load_state_dict(weights)
        export_pt2(model, example, config, out_dir / PT2)
    return out_dir


def export_pt2(model: torch.nn.Module, example: torch.Tensor, config: dict[str, Any], path: Path) -> Path | None:
    """`torch.export` `model` (any batch size) to `path`, the data/loss config inside. A model
    it cannot trace gets a one-line warning and no file: the safetensors export still serves."""
    keep = {k: config[k] for k in ("data", "loss", "seed") if k in config}
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # torch wants a .pt2 name
    try:
        model = model.cpu().eval()
        with quiet_torch():
            program = torch.export.export(model, (example.cpu(),), dynamic_shapes=({0: torch.export.Dim("batch")},))
            torch.export.save(program, tmp, extra_files={"config.json": json.dumps(keep)})
        os.replace(tmp, path)
        return path
    except Exception as err:  # any tracing failure: the export is optional
        tmp.unlink(missing_ok=True)
        print(
            f"warning: {path}: torch.export failed, no .pt2 written ({type(err).__name__}: "
            f"{first_line(err)}); the safetensors export is kept",
            file=sys.stderr,
        )
        return None


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # the project's one-line errors, not usage + error
        self.exit(2, f"error: {message}; usage: python -m engine.export CHECKPOINT [OUT_DIR] (--help for more)\n")


def main(argv: list[str] | None = None) -> None:
    parser = _OneLineParser(
        prog="python -m engine.export",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Export a train.py checkpoint's model for deployment: a folder with\n"
        "model.safetensors (tensors only: loading it runs no code) and config.yaml\n"
        "(the data/model/loss sections that rebuild the model). evaluate.py and\n"
        "predict.py take the folder as ckpt=.",
        epilog="examples:\n"
        "  python -m engine.export checkpoints/digits_cnn/best.pt\n"
        "  python -m engine.export checkpoints/digits_cnn/epoch_0010.pt exports/digits\n"
        "  python predict.py ckpt=exports/digits input=my_digits/",
    )
    parser.add_argument("checkpoint", type=Path, help="a train.py checkpoint file (.pt)")
    parser.add_argument(
        "out_dir",
        type=Path,
        nargs="?",
        default=None,
        help="export folder (default: the checkpoint's path without .pt, e.g. best.pt -> best/)",
    )
    args = parser.parse_args(argv)  # --help exits 0; a wrong argument count exits 2
    try:
        print(f"exported to {export_checkpoint(args.checkpoint, args.out_dir)}")
    except Exception as err:  # bad input or a disk's refusal: one line, exit 2
        user = user_error_in(err)
        if user is None:
            raise
        print(f"error: {one_line(user)}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
