"""`make label STUDIES=<folder> PORT=<port>`: the MONAI Label server on 127.0.0.1 with this
repository's bundle as its model ``ptsam`` (app: ``label/app``).

The frozen SAM is chosen as `make demo` chooses it: ``SAM_CHECKPOINT`` (with ``SAM_VARIANT``,
default vit_b), else ``bundle/models/sam_vit_b_01ec64.pth``, else the `tiny` generalist. It must
be the backbone that ``bundle/models/model.pt`` was trained on.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", required=True, help="folder of images (labels go to <studies>/labels/final)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bundle", default=str(REPO / "bundle"))
    args = parser.parse_args()

    studies = Path(args.studies).resolve()
    if not studies.is_dir():
        sys.exit(f"{studies}: no such studies folder")
    sys.path.insert(0, args.bundle)
    from scripts.demo.run import backbone

    variant, checkpoint, _ = backbone()
    command = [
        sys.executable, "-m", "monailabel.main", "start_server",
        "--app", str(REPO / "label" / "app"), "--studies", str(studies),
        "--conf", "bundle", str(Path(args.bundle).resolve()),
        "--conf", "sam_variant", variant, "--conf", "sam_checkpoint", checkpoint,
        "--host", args.host, "--port", str(args.port),
    ]  # fmt: skip
    print("$ " + " ".join(command), flush=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
