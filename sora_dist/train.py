"""Entry point for torchrun: ``torchrun --nproc-per-node 1 -m sora_dist.train --config FILE [overrides]``."""

import sys

from sora_dist.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
