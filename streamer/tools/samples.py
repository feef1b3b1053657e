"""``streamer samples DIR``: write the sample image corpus (see ``streamer.corpus``) to a folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("samples", help="write sample images (JPEG, PNG, WebP) to DIR")
    parser.add_argument("directory", type=Path)
    parser.add_argument("-n", "--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    from streamer.corpus import generate

    args.directory.mkdir(parents=True, exist_ok=True)
    for sample in generate(args.count, seed=args.seed):
        (args.directory / sample.name).write_bytes(sample.data)
    print(f"wrote {args.count} images to {args.directory}")
    return 0
