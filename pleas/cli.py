"""The ``pleas`` console script: ``pleas merge ...``, ``pleas spec MODEL``, ``pleas methods``,
``pleas export MERGED_DIR --format F --out FILE``.

Each subcommand is a small function taking its own argv; user errors exit with code 2 and one
line on stderr.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _load_for_spec(name: str):
    """A zoo name or checkpoint file (its own errors are reported as they are), else an
    architecture name built with random weights; returns ``(model, default input shape)``."""
    from . import zoo
    from .models import ARCHITECTURES, build_model

    if Path(name).expanduser().exists() or name in zoo.names():
        model, info = zoo.resolve(name)
        cfg = dict(info.config or {})
        return model, f"{cfg.get('in_chans', 1)},{cfg.get('img_size', 28)},{cfg.get('img_size', 28)}"
    model = build_model(name)
    return model, "1,28,28" if name in ARCHITECTURES else "3,224,224"


def _parse(p: argparse.ArgumentParser, argv: list[str]):
    """The parsed arguments, or the exit code of -h (0) or of a bad flag (2, said already)."""
    try:
        return p.parse_args(argv)
    except SystemExit as stop:
        return int(stop.code or 0)


def input_shape(text: str) -> tuple[int, ...]:
    """``--input-shape C,H,W`` as integers (a ValueError naming the flag otherwise)."""
    try:
        return tuple(int(s) for s in text.split(","))
    except ValueError:
        raise ValueError(f"--input-shape must be C,H,W integers, got {text!r}") from None


def spec_main(argv: list[str]) -> int:
    from .permute import self_test
    from .spec import derive_spec

    from .cli_merge import _Parser

    p = _Parser(prog="pleas spec",
                                description="Derive, check and print a model's permutation spec.")
    p.add_argument("model", help="built-in name, checkpoint file, or an architecture "
                                 "(resnet20, timm:resnet18, torchvision:resnet50, ...)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input (default 1,28,28 "
                                                       "for the zoo, 3,224,224 otherwise)")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    try:
        model, default_shape = _load_for_spec(args.model)
        shape = input_shape(args.input_shape or default_shape)
        spec = derive_spec(model, (2, *shape))
        print(spec.describe())
        result = self_test(model, spec)
        print(result)
        return 0 if result.passed else 1
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def methods_main(argv: list[str]) -> int:
    from . import methods

    argparse.ArgumentParser(prog="pleas methods",
                            description="List the registered merge methods.").parse_args(argv)
    for name in methods.names():
        m = methods.get(name)
        width = ("width K (K models)" if m.side_by_side else f"width {m.fixed_width:g}"
                 if m.fixed_width else "width 1..K")
        print(f"{name:<18} {m.family:<12} {width:<11} {m.summary}")
        if m.params:
            print(" " * 19 + "params: " + ", ".join(f"{p.name}={p.default!r}" for p in m.params))
    return 0


def export_main(argv: list[str]) -> int:
    """Write a saved merged model as ONNX, TorchScript or a torch.export program."""
    import torch

    from .cli_merge import _Parser
    from .export import FORMATS, example_input_for, export_model
    from .merged import load_merged

    p = _Parser(prog="pleas export", description="Export a merged model folder to a "
                "standalone file that runs without pleas.")
    p.add_argument("merged", metavar="MERGED_DIR", help="a folder written by pleas merge")
    p.add_argument("--format", required=True, choices=FORMATS, help="the file format")
    p.add_argument("--out", required=True, help="the file to write (an existing path is "
                                                "refused unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier pleas export at --out (never another file)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input (default: as "
                                                       "recorded in merged.json)")
    args = _parse(p, argv)
    if isinstance(args, int):
        return args
    try:
        model = load_merged(args.merged)
        if args.input_shape:
            x = torch.zeros((2, *input_shape(args.input_shape)))
        else:
            x = example_input_for(model)
        result = export_model(model, args.out, args.format, x, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    diff = ("not checked (onnxruntime is not installed)" if result.max_abs_diff is None
            else f"max |difference| to PyTorch {result.max_abs_diff:.2e}")
    print(f"wrote {result.path} ({result.format}; input {tuple(x.shape[1:])} with any batch "
          f"size; outputs {', '.join(result.outputs)}; {diff})")
    return 0


def _merge(argv: list[str]) -> int:
    from .cli_merge import main as merge_main
    return merge_main(argv)


COMMANDS = {"merge": (_merge, "merge models (see pleas merge -h)"),
            "spec": (spec_main, "print and self-test a model's permutation spec"),
            "methods": (methods_main, "list the registered merge methods"),
            "export": (export_main, "export a merged model to ONNX, TorchScript or torch.export")}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pleas {" + ",".join(COMMANDS) + "} ...")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:<8} {text}")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; expected one of {', '.join(COMMANDS)}",
              file=sys.stderr)
        return 2
    return COMMANDS[cmd][0](rest)


if __name__ == "__main__":
    raise SystemExit(main())
