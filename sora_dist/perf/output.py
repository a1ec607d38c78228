"""What every benchmark does with its result: rank 0 prints it and, if asked, writes its JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def report_on_rank_zero(result: dict, print_result: Callable[[dict], None], json_path: str) -> None:
    """Print ``result`` (and write it to ``json_path`` when given) on rank 0 only."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print_result(result)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
