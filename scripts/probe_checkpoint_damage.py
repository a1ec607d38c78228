"""Three damaged checkpoints resumed by whatever sora_dist is on the path: bytes flipped in a shard
(same size), a tensor renamed inside .metadata, and a .metadata crafted to create a file when it is
unpickled. Prints, per case, what the resume did and whether the crafted file appeared.

  python scripts/probe_checkpoint_damage.py runs/damage                          # this checkout
  PYTHONPATH=/path/to/older/checkout python scripts/probe_checkpoint_damage.py runs/damage-old

One process, the demo model at hidden size 64, checkpoints every 4 steps; the newest (step 12) is
damaged, then the run is resumed to step 16.
"""

import pickle
import shutil
import sys
from pathlib import Path

import sora_dist
from sora_dist.cli import main
from sora_dist.data import make_synthetic

REPO = Path(__file__).resolve().parents[1]


class Crafted:
    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


def train(out: Path, data: Path, steps: int) -> int:
    return main(["train", "--config", str(REPO / "configs" / "demo.yaml"), f"--data.path={data}", f"--train.out_dir={out}",
                 "--data.num_workers=0", "--model.hidden_size=64", "--model.depth=2", "--train.max_minutes=0",
                 "--logging.tensorboard=false", "--optim.warmup_steps=2", "--logging.log_every=4", "--train.sample_at_end=false",
                 "--train.sample_every=0", "--checkpoint.resume=auto", "--checkpoint.every_steps=4", "--checkpoint.keep_last=0",
                 f"--train.steps={steps}"])


def damage(case: str, checkpoint: Path, marker: Path) -> None:
    if case == "flipped-bytes":
        shard = checkpoint / "__0_0.distcp"
        data = bytearray(shard.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        shard.write_bytes(bytes(data))
    elif case == "renamed-tensor":
        metadata = checkpoint / ".metadata"
        metadata.write_bytes(metadata.read_bytes().replace(b"model.x_embedder.weight", b"model.x_embedder.weighs"))
    else:
        (checkpoint / ".metadata").write_bytes(pickle.dumps(Crafted(str(marker))))


def main_probe(root: Path) -> None:
    print(f"sora_dist from {Path(sora_dist.__file__).parent}")
    data = root / "data"
    if not data.exists():
        make_synthetic(data, 96, seed=0, samples_per_shard=16)
    base = root / "base"
    if not base.exists():
        train(base, data, 12)
    marker = root / "crafted-code-ran"
    for case in ("flipped-bytes", "renamed-tensor", "crafted-metadata"):
        run = root / case
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        marker.unlink(missing_ok=True)
        damage(case, run / "checkpoints" / "step-12", marker)
        try:
            outcome = f"exit {train(run, data, 16)}"
        except BaseException as err:  # noqa: BLE001 - the old code let DCP's exception through
            outcome = f"raised {type(err).__name__}"
        print(f"{case}: {outcome}; crafted file created: {marker.exists()}")


if __name__ == "__main__":
    main_probe(Path(sys.argv[1]))
