"""Export a train.py checkpoint for deployment: a folder with model.safetensors (tensors only: loading
it runs no code) and config.yaml (the data/model/loss sections that rebuild the model), which evaluate.py
and predict.py take as ckpt=. checkpoint.export_pt2=true adds model.pt2 (torch.export, no Python class).

examples:
  python -m engine.export checkpoints/digits_cnn/best.pt
  python -m engine.export checkpoints/digits_cnn/epoch_0010.pt exports/digits
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import torch
import yaml

from engine.checkpoint import CONFIG, PT2, WEIGHTS, inference_weights, load_checkpoint
from engine.config import saved_sections
from engine.errors import cli_errors, first_line
from engine.run_dir import check_export_dir, write_atomic


def export_checkpoint(
    source: Path, out_dir: Path | None = None, model: torch.nn.Module | None = None, example: torch.Tensor | None = None
) -> Path:
    """A checkpoint's (EMA when kept) weights and config, with the data module's state as plain lists
    (data=csv: the scaling predict applies), as an export folder (default: its path without .pt), each
    file atomic, never a run folder's own; with `model` and an `example` batch, model.pt2 too."""
    from safetensors.torch import save  # lazy: safetensors costs start-up time

    ckpt = load_checkpoint(source)
    saved_sections(ckpt.get("config"), source)  # what evaluate.py would refuse is refused
    weights, config, data_state = inference_weights(ckpt), ckpt.get("config") or {}, ckpt.get("data_state_dict")
    keep = {k: config[k] for k in ("data", "model", "loss", "seed") if k in config}
    if data_state:
        keep["data_state"] = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in data_state.items()}
    out_dir = out_dir or source.with_suffix("")
    check_export_dir(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in weights.items()}
    saved = save(tensors, metadata={"format": "pt", "config": json.dumps(keep)})
    write_atomic(out_dir / WEIGHTS, lambda out: out.write(saved), binary=True)
    write_atomic(out_dir / CONFIG, lambda out: out.write(yaml.safe_dump(keep, sort_keys=False)))
    if model is not None and example is not None:
        model.load_state_dict(weights)
        export_pt2(model, example, keep, out_dir / PT2)
    return out_dir


def export_pt2(model: torch.nn.Module, example: torch.Tensor, config: dict, path: Path) -> Path | None:
    """`torch.export` `model` (any batch size) to `path`, `config` inside (extra/config.json); a
    model it cannot trace gets a one-line warning and no file (the safetensors export serves).
    A deployment artifact: never loaded here, as torch.export.load is not weights-only."""
    extra = {"config.json": json.dumps(config)}
    logging.disable(logging.WARNING)  # torch.export logs pages of tracing detail on failure
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            batch = {0: torch.export.Dim("batch")}
            program = torch.export.export(model.cpu().eval(), (example.cpu(),), dynamic_shapes=(batch,))
            return write_atomic(path, lambda out: torch.export.save(program, out, extra_files=extra), binary=True)
    except Exception as err:  # any tracing failure: the export is optional
        why = f"torch.export failed, no .pt2 written ({type(err).__name__}: {first_line(err)})"
        print(f"warning: {path}: {why}; the safetensors export is kept", file=sys.stderr)
        return None
    finally:
        logging.disable(logging.NOTSET)


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):  # the project's one-line errors, not usage + error
        self.exit(2, f"error: {message}; usage: python -m engine.export CHECKPOINT [OUT_DIR] (--help for more)\n")


def main(argv: list[str] | None = None) -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = _OneLineParser(prog="python -m engine.export", description=__doc__, formatter_class=formatter)
    parser.add_argument("checkpoint", type=Path, help="a train.py checkpoint file (.pt)")
    parser.add_argument("out_dir", type=Path, nargs="?", help="export folder (default: CHECKPOINT without .pt)")
    cli_errors(_export)(parser.parse_args(argv))  # --help exits 0; a wrong argument count exits 2


def _export(args: argparse.Namespace) -> None:
    print(f"exported to {export_checkpoint(args.checkpoint, args.out_dir)}")


if __name__ == "__main__":
    main()
