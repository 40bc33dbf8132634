"""Command line: `python -m hdkdlib info NAME [--num-classes N] [--json] [--convention msdnet|macs]`."""
from __future__ import annotations

import argparse
import json
import sys

from . import cli, cost, models

MAX_CLASSES = 100_000  # ImageNet-21k has 21,841


def info(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hdkdlib info",
                                     description="Exits, cumulative MFLOPs and parameters of a built-in network.")
    parser.add_argument("name", help="one of: " + ", ".join(models.names()))
    parser.add_argument("--num-classes", type=int, default=None,
                        help="classes of the heads (default: 1000 for ImageNet networks, 100 otherwise)")
    parser.add_argument("--convention", choices=cost.CONVENTIONS, default=None,
                        help="msdnet (the reference counter's rules) or macs; default: the network's own (msdnet "
                             "for MSDNets, macs for exits on torchvision backbones)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {exit, mflops, params}")
    args = parser.parse_args(argv)
    if args.name not in models.names():
        parser.error(f"unknown model {args.name!r}; valid names: {', '.join(models.names())}")
    if args.num_classes is not None and args.num_classes < 1:
        parser.error(f"--num-classes must be >= 1, got {args.num_classes}")
    if args.num_classes is not None and args.num_classes > MAX_CLASSES:
        parser.error(f"--num-classes must lie in [1, {MAX_CLASSES:,}] (more classes than any image dataset has would "
                     f"only build an enormous head), got {args.num_classes}")
    num_classes = args.num_classes or cost.default_num_classes(args.name)
    model = models.build(args.name, num_classes)
    input_shape = model.input_shape
    rows = [{"exit": r["exit"], "mflops": round(r["flops"] / 1e6, 4), "params": r["params"]}
            for r in cost.per_exit(model, input_shape, args.convention)]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{args.name}  ({num_classes} classes, input {list(input_shape)}, convention "
          f"{args.convention or getattr(model, 'cost_convention', 'msdnet')})")
    print(f"{'exit':>4} {'MFLOPs':>10} {'params (M)':>11}")
    for r in rows:
        print(f"{r['exit']:>4} {r['mflops']:>10.2f} {r['params'] / 1e6:>11.3f}")
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):  # asked for: the usage on stdout, success
        print(__doc__.strip())
        return 0
    if not argv or argv[0] not in ("info",):
        print(__doc__.strip(), file=sys.stderr)
        return 2
    return info(argv[1:])


if __name__ == "__main__":
    sys.exit(cli.run(main))
