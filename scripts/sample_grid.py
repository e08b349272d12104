"""Real | purified sample grid from a `purifier bench --cache` run (no new compute).

    python scripts/sample_grid.py runs/bench-cache-mnist mnist paper docs/figures/mnist-real-vs-purified.png

Picks the cached clean run of the named configuration (paper: L=200, R=10, momentum SGD)
and writes 4 rows of pairs: each real test image followed by its purified version.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torchvision.utils import save_image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from purifier import data  # noqa: E402
from purifier.projection import preset  # noqa: E402


def main(cache_dir: str, dataset: str, config: str, out: str, pairs: int = 16) -> None:
    want = preset(config)
    for f in sorted(Path(cache_dir).glob("*.pt")):
        entry = torch.load(f, weights_only=True)
        meta = json.loads(entry["meta"])
        proj = meta["projection"]
        if (meta.get("condition") == "clean" and proj["steps"] == want.steps
                and proj["restarts"] == want.restarts and proj["optimizer"] == want.optimizer):
            break
    else:
        sys.exit(f"no cached clean {config} run in {cache_dir}")
    test = data.load(dataset, "test")
    idx = entry["indices"][:pairs]
    real, purified = test.images[idx], entry["images"][:pairs].float()
    grid = torch.stack([real, purified], 1).flatten(0, 1)  # (2*pairs, C, H, W): real, purified, ...
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, out, nrow=8, padding=2, pad_value=0.5)
    print(f"wrote {out}: {pairs} pairs (real, purified) from {f.name}, errors "
          f"{[round(float(e), 4) for e in entry['errors'][:pairs]]}")


if __name__ == "__main__":
    if len(sys.argv) != 5:
        sys.exit(__doc__)
    main(*sys.argv[1:5])
