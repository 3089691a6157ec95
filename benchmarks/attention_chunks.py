"""How large a query chunk the ONNX export of the encoder should use: ONNX Runtime's encoder time
against segment-anything's, for global attention whole and in chunks of 512, 256 and 128 queries
(ViT-B at 1024 px, random weights in the official format), interleaved repeats, medians; and
each export's peak resident memory for one image, in a fresh process.

    python benchmarks/attention_chunks.py [--chunks 0,512,256,128] [--repeats 3]

Each export is made once here (tens of seconds; smaller chunks take longer), then timed. What
it printed on each machine is in bundle/docs/benchmarks.md, "ONNX export: attention in chunks".
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bundle"))
warnings.simplefilter("ignore", UserWarning)

from bench import machine  # noqa: E402

from scripts.model.network import PTSAM  # noqa: E402
from scripts.model.runtime import _Encoder, write_onnx  # noqa: E402

# One image through an export in a fresh process; its peak resident memory (kB, Linux).
PEAK = """
import sys, numpy as np, onnxruntime as ort
options = ort.SessionOptions(); options.intra_op_num_threads = 1; options.log_severity_level = 3
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
session.run(None, {"image": np.zeros((1, 3, 1024, 1024), np.float32)})
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def peak_mb(path: Path) -> float:
    out = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chunks", default="0,512,256,128", help="queries per chunk; 0: the whole attention")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import onnxruntime as ort

    print(machine(), flush=True)
    encoder = PTSAM("vit_b", n_md_prompts=0).eval().backbone.image_encoder
    image = torch.randn(1, 3, 1024, 1024)
    with torch.no_grad():
        reference = encoder(image).numpy()
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = torch.get_num_threads(), 3
    runs, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in (int(c) for c in args.chunks.split(",")):
            path = Path(tmp) / f"encoder_{chunk}.onnx"
            start = time.perf_counter()
            write_onnx(_Encoder(encoder, None, chunk or None).eval(), torch.zeros(2, 3, 1024, 1024), path, "embeddings")
            export_s = time.perf_counter() - start
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            out = session.run(None, {"image": image.numpy()})[0]
            error = float(np.linalg.norm(out - reference) / np.linalg.norm(reference))
            rows[chunk] = {"export_s": round(export_s, 1), "rel_error": f"{error:.1e}", "peak_mb": peak_mb(path)}
            runs[chunk] = lambda session=session: session.run(None, {"image": image.numpy()})

        def stock() -> None:
            with torch.no_grad():
                encoder(image)

        times: dict[object, list[float]] = {"stock": [], **{c: [] for c in runs}}
        for _ in range(args.repeats):
            for key, fn in (("stock", stock), *runs.items()):
                start = time.perf_counter()
                fn()
                times[key].append(time.perf_counter() - start)
    stock_s = statistics.median(times["stock"])
    print(f"segment-anything's encoder: {stock_s:.2f} s (median of {args.repeats})")
    for chunk, row in rows.items():
        ratio = statistics.median(times[chunk]) / stock_s
        print(
            f"chunk {chunk or 'whole':>5}: ratio {ratio:.3f}  export {row['export_s']} s  "
            f"peak memory {row['peak_mb']:.0f} MB  rel. error {row['rel_error']}"
        )


if __name__ == "__main__":
    main()
