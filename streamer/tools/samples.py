"""``streamer samples DIR``: write the sample image corpus (see ``streamer.corpus``) to a folder.

The photos come from scikit-image, which only the ``samples`` extra installs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from streamer.tools.errors import one_line_errors, require_extra

# What the samples extra installs, by import name.
SAMPLES_MODULES = ("skimage",)


def add_parser(commands: Any) -> None:
    parser = commands.add_parser("samples", help="write sample images (JPEG, PNG, WebP) to DIR")
    parser.add_argument("directory", type=Path)
    parser.add_argument("-n", "--count", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_main)


@one_line_errors("samples")
def _main(args: argparse.Namespace) -> int:
    require_extra("samples", "samples", SAMPLES_MODULES)
    from streamer.corpus import generate

    args.directory.mkdir(parents=True, exist_ok=True)
    for sample in generate(args.count, seed=args.seed):
        (args.directory / sample.name).write_bytes(sample.data)
    print(f"wrote {args.count} images to {args.directory}")
    return 0
