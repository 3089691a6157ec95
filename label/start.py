"""`make label STUDIES=<folder> PORT=<port>`: the MONAI Label server on 127.0.0.1 with this
repository's bundle as its model ``ptsam`` (app: ``label/app``).

The frozen SAM is chosen as `make demo` chooses it: ``SAM_CHECKPOINT`` (with ``SAM_VARIANT``,
default vit_b), else ``bundle/models/sam_vit_b_01ec64.pth``, else the `tiny` generalist. It must
be the backbone that ``bundle/models/model.pt`` was trained on.

Inference's CPU fast paths (``--encoder-engine onnxruntime``, ``--encoder-int8 true``,
``--encoder-engine openvino --encoder-bf16 true``, or ``ENCODER_ENGINE`` / ``ENCODER_INT8`` /
``ENCODER_BF16``, so `make label ENCODER_ENGINE=onnxruntime`): the image encoder exported once
to ONNX and run there (``docs/benchmarks.md``); refused on a CUDA machine.

``--allow-other-kind true`` (or ``ALLOW_OTHER_KIND``): segment images of another kind (2D image,
3D volume) than ``model.pt``'s prompts were trained on, which inference refuses by default.

Browsers: only the server's own origin and OHIF's development server (port 3000), each as
http://localhost and http://127.0.0.1, may call the server from a web page (3D Slicer is no
browser and needs none). ``--cors-origins`` (or ``CORS_ORIGINS``, so `make label CORS_ORIGINS=...`)
adds comma-separated origins, e.g. ``http://viewer.example:8080``; ``*`` allows every origin. No
origin is allowed credentials (cookies), and only the methods MONAI Label's endpoints use.

MONAI Label's own policy answers any origin, with credentials and all methods; its setting
``MONAI_LABEL_CORS_ORIGINS`` cannot narrow it in 0.8.5 (the server does not start with it set, and
its origins end in a "/" that no browser's ``Origin`` has). So the server process is this script
again (``start.py serve <origins> start_server ...``): MONAI Label's ``start_server`` with the
policy above in place of MONAI Label's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
# What MONAI Label's endpoints use (OPTIONS is the preflight itself).
CORS_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE")
OHIF_DEV_PORT = 3000


def _origin(text: str) -> str:
    """``scheme://host[:port]`` as a browser sends it in ``Origin`` (no path, no trailing slash)."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise ValueError(f"{text!r}: not an origin (expected http(s)://host[:port])")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{text!r}: an origin has no path or query (expected http(s)://host[:port])")
    try:
        parts.port  # noqa: B018 (reading it checks it)
    except ValueError as err:
        raise ValueError(f"{text!r}: {err}") from err
    return f"{parts.scheme}://{parts.netloc.lower()}"


def cors_origins(extra: str, host: str, port: int) -> list[str]:
    """The origins allowed to call the server from a web page; ``["*"]`` for any."""
    added = [item for item in extra.split(",") if item.strip()]
    if any(item.strip() == "*" for item in added):
        return ["*"]
    hosts = {"localhost", "127.0.0.1"} | ({host.lower()} if host not in ("0.0.0.0", "::") else set())
    hosts = {f"[{name}]" if ":" in name else name for name in hosts}  # an IPv6 address
    local = [f"http://{name}:{p}" for p in dict.fromkeys((port, OHIF_DEV_PORT)) for name in sorted(hosts)]
    return list(dict.fromkeys(local + [_origin(item) for item in added]))


def serve(origins: list[str], argv: list[str]) -> None:
    """MONAI Label's ``start_server`` (``argv``, its arguments) with CORS for ``origins`` only."""
    from fastapi.middleware.cors import CORSMiddleware
    from monailabel.app import app
    from monailabel.main import Main
    from starlette.middleware import Middleware

    policy = Middleware(
        CORSMiddleware, allow_origins=origins, allow_methods=CORS_METHODS, allow_headers=["*"], allow_credentials=False
    )
    # The middleware stack is built at the first request (the server's start-up): replaced before it.
    cors = [i for i, entry in enumerate(app.user_middleware) if entry.cls is CORSMiddleware]
    if len(cors) != 1 or app.middleware_stack is not None:
        sys.exit("this MONAI Label version sets CORS in a way start.py does not know: not starting")
    app.user_middleware[cors[0]] = policy
    print(f"CORS, in place of MONAI Label's above: {origins}, {list(CORS_METHODS)}, no credentials", flush=True)
    sys.argv = ["monailabel", *argv]
    Main().run()


def main() -> None:
    if sys.argv[1:2] == ["serve"]:
        serve(json.loads(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", required=True, help="folder of images (labels go to <studies>/labels/final)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--bundle", default=str(REPO / "bundle"))
    parser.add_argument(
        "--cors-origins",
        default=os.environ.get("CORS_ORIGINS", ""),
        help="comma-separated origins a web page may call the server from, besides the local ones; '*' for any",
    )
    parser.add_argument(
        "--encoder-engine",
        default=os.environ.get("ENCODER_ENGINE", ""),
        help="inference's image-encoder engine on a CPU: torch (default), onnxruntime or openvino",
    )
    parser.add_argument(
        "--encoder-int8",
        default=os.environ.get("ENCODER_INT8", ""),
        help="true: the encoder's linear layers in int8 (inference on a CPU; masks agree at Dice >= 0.98)",
    )
    parser.add_argument(
        "--encoder-bf16",
        default=os.environ.get("ENCODER_BF16", ""),
        help="true: the encoder in bfloat16 with --encoder-engine openvino, on a CPU with bfloat16 units "
        "(masks agree at Dice >= 0.98)",
    )
    parser.add_argument(
        "--allow-other-kind",
        default=os.environ.get("ALLOW_OTHER_KIND", ""),
        help="true: segment 2D images with prompts trained on volumes, or volumes with prompts trained on 2D images",
    )
    args = parser.parse_args()

    studies = Path(args.studies).resolve()
    if not studies.is_dir():
        sys.exit(f"{studies}: no such studies folder")
    try:
        origins = cors_origins(args.cors_origins, args.host, args.port)
    except ValueError as err:
        sys.exit(f"--cors-origins: {err}")
    sys.path.insert(0, args.bundle)
    from scripts.demo.run import backbone

    variant, checkpoint, _ = backbone()
    command = [
        sys.executable, str(Path(__file__).resolve()), "serve", json.dumps(origins), "start_server",
        "--app", str(REPO / "label" / "app"), "--studies", str(studies),
        "--conf", "bundle", str(Path(args.bundle).resolve()),
        "--conf", "sam_variant", variant, "--conf", "sam_checkpoint", checkpoint,
        "--host", args.host, "--port", str(args.port),
    ]  # fmt: skip
    for key in ("encoder_engine", "encoder_int8", "encoder_bf16", "allow_other_kind"):
        value = getattr(args, key)
        if value:
            command += ["--conf", key, value]
    print("$ " + shlex.join(command), flush=True)
    os.execv(sys.executable, command)


if __name__ == "__main__":
    main()
