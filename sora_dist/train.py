"""Entry point for torchrun: ``torchrun --nproc-per-node 1 -m sora_dist.train --config FILE [overrides]``."""

import sys

from sora_dist.cli import main
from sora_dist.console import exit_process

if __name__ == "__main__":
    exit_process(main(["train", *sys.argv[1:]]))
