"""The ``pleas`` console script: ``pleas merge ...`` and ``pleas spec MODEL``."""
from __future__ import annotations

import argparse
import sys


def spec_main(argv: list[str]) -> int:
    from . import zoo
    from .permute import self_test
    from .spec import SpecError, derive_spec

    p = argparse.ArgumentParser(prog="pleas spec",
                                description="Derive, check and print a model's permutation spec.")
    p.add_argument("model", help="built-in name, checkpoint file, or an architecture "
                                 "(resnet20, timm:resnet18, torchvision:resnet50, ...)")
    p.add_argument("--input-shape", default=None, help="C,H,W of one input (default 1,28,28 "
                                                       "for the zoo, 3,224,224 otherwise)")
    args = p.parse_args(argv)
    try:
        try:
            model, info = zoo.resolve(args.model)
            default_shape = "1,28,28"
        except Exception:
            from .models import ARCHITECTURES, build_model
            model = build_model(args.model)
            default_shape = "1,28,28" if args.model in ARCHITECTURES else "3,224,224"
        shape = tuple(int(s) for s in (args.input_shape or default_shape).split(","))
        spec = derive_spec(model, (2, *shape))
        print(spec.describe())
        result = self_test(model, spec)
        print(result)
        return 0 if result.passed else 1
    except (SpecError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: pleas {merge,spec} ...\n  merge  merge two models (see pleas merge -h)\n"
              "  spec   print and self-test a model's permutation spec")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "merge":
        from .cli_merge import main as merge_main
        return merge_main(rest)
    if cmd == "spec":
        return spec_main(rest)
    print(f"unknown command {cmd!r}; expected merge or spec", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
