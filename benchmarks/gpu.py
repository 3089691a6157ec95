"""`make bench-gpu`: full-size SAM backbones on a CUDA card, each comparison side by side in one run.

For ViT-B, ViT-L and ViT-H at 1024 px (random weights, batch 1):
- encoder forward: stock segment-anything vs ours (fused attention), fp32 and AMP;
- an MD+IE training step (8 image-encoder tokens per block, 8 decoder tokens): time and peak
  GPU memory with activation checkpointing off/on and AMP off/on;
- an MD-only training step on a cached embedding (what every epoch after the first costs).

Then the real training workflow (`monai.bundle run training`, ViT-B MD+IE, batch 4, synthetic
microscopy) with AMP and activation checkpointing off/on: peak GPU memory and seconds per epoch,
and the inference workflow with AMP.

AMP results are checked against fp32 (logit error and mask agreement). Prints a table and
writes bench-gpu.json with the card. BENCH_VARIANTS=vit_b limits the variants.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bundle"))
sys.path.insert(0, str(ROOT / "benchmarks"))
warnings.simplefilter("ignore", UserWarning)

from bench import machine  # noqa: E402

from scripts.model.encoder import encode_image  # noqa: E402
from scripts.model.network import PTSAM  # noqa: E402

VARIANTS = [v for v in os.environ.get("BENCH_VARIANTS", "vit_b,vit_l,vit_h").split(",") if v]
REPEATS = int(os.environ.get("BENCH_REPEATS", "10"))
AMP_DTYPE = torch.bfloat16
GIB = 2**30


def cuda_ms(fn: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median milliseconds of ``fn`` on the GPU (CUDA events), after two warm-up calls."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def autocast(amp: bool):
    return torch.autocast("cuda", dtype=AMP_DTYPE) if amp else nullcontext()


def bench_encoder(net: PTSAM, image: torch.Tensor) -> dict[str, float]:
    encoder = net.backbone.image_encoder

    def stock(amp: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad(), autocast(amp):
                return encoder(image)

        return run

    def ours(amp: bool) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad(), autocast(amp):
                return encode_image(encoder, image, None, fused=True)

        return run

    reference, fused, fused_amp = stock(False)(), ours(False)(), ours(True)().float()
    # cuDNN (patch embedding) and the fused kernels may use TF32 by default; without it the
    # two fp32 paths should agree to fp32 accuracy.
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    strict = float((ours(False)() - stock(False)()).abs().max())
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    out = {
        "encoder_ms_stock_fp32": cuda_ms(stock(False)),
        "encoder_ms_ours_fp32": cuda_ms(ours(False)),
        "encoder_ms_stock_amp": cuda_ms(stock(True)),
        "encoder_ms_ours_amp": cuda_ms(ours(True)),
        "encoder_max_abs_diff_fp32": float((fused - reference).abs().max()),
        "encoder_max_abs_diff_fp32_no_tf32": strict,
        "encoder_output_scale": float(reference.abs().max()),
        "encoder_amp_rel_error": float((fused_amp - reference).norm() / reference.norm()),
    }
    out["encoder_time_ratio_fp32"] = out["encoder_ms_ours_fp32"] / out["encoder_ms_stock_fp32"]
    out["encoder_time_ratio_amp"] = out["encoder_ms_ours_amp"] / out["encoder_ms_stock_amp"]
    return out


def train_step(
    net: PTSAM, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool, embedded: bool = False
) -> None:
    with autocast(amp):
        logits = net(x, embedded=embedded)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def bench_ie_training(net: PTSAM, image: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MD+IE training step: time and peak memory for checkpointing x AMP."""
    optimiser = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    out: dict[str, float] = {}
    for ckpt in (False, True):
        for amp in (False, True):
            name = f"{'ckpt' if ckpt else 'plain'}_{'amp' if amp else 'fp32'}"
            net.activation_checkpointing = ckpt
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            try:
                out[f"ie_step_ms_{name}"] = cuda_ms(lambda a=amp: train_step(net, optimiser, image, target, a), 5)
                out[f"ie_step_peak_gib_{name}"] = torch.cuda.max_memory_allocated() / GIB
            except torch.OutOfMemoryError:
                out[f"ie_step_ms_{name}"] = out[f"ie_step_peak_gib_{name}"] = float("nan")
                optimiser.zero_grad(set_to_none=True)
    net.activation_checkpointing = False
    return out


def bench_amp_agreement(net: PTSAM, image: torch.Tensor) -> dict[str, float]:
    """AMP against fp32 on the same network and input: logit error and mask agreement (Dice)."""
    with torch.no_grad():
        ref = net(image)
        with autocast(True):
            low = net(image).float()
    a, b = ref > 0, low > 0
    dice = 2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1)
    return {
        "amp_logit_max_abs_diff": float((low - ref).abs().max()),
        "amp_logit_scale": float(ref.abs().max()),
        "amp_mask_dice_vs_fp32": float(dice),
    }


def bench_cached_step(net: PTSAM, image: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """An MD-only step on a cached embedding vs one that recomputes the encoder."""
    optimiser = torch.optim.AdamW([net.md_prompts.tokens], lr=1e-3)
    with torch.no_grad():
        embedding = net.encode(image)

    def recompute() -> None:
        with torch.no_grad():
            e = net.encode(image)
        train_step(net, optimiser, e, target, False, embedded=True)

    cached = cuda_ms(lambda: train_step(net, optimiser, embedding, target, False, embedded=True))
    full = cuda_ms(recompute)
    return {"md_step_ms_cached": cached, "md_step_ms_recompute": full, "cache_step_speedup": full / cached}


def bench_workflows(variant: str = "vit_b", epochs: int = 2) -> dict[str, float]:
    """The bundle's own training and inference workflows, as a user runs them, on the GPU."""
    import tempfile
    import time

    from monai.bundle import run

    from scripts.demo.synthetic import generate

    configs = ROOT / "bundle" / "configs"
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(generate(tmp, seed=0, n_train=8, n_val=2, modalities="microscopy")["microscopy"]).parent
        common = {"bundle_root": str(ROOT / "bundle"), "dataset_dir": str(data), "sam_variant": variant}
        common["allow_random_weights"] = True  # timing only: no weights on the benchmark machine
        for ckpt, amp in ((False, False), (True, False), (False, True), (True, True)):
            name = f"{'ckpt' if ckpt else 'plain'}_{'amp' if amp else 'fp32'}"
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            run(
                "training",
                config_file=str(configs / "train.yaml"),
                **common,
                n_ie_prompts=8,
                batch_size=4,
                epochs=epochs,
                activation_checkpointing=ckpt,
                amp=amp,
                tracking_enabled=False,
                output_dir=f"{tmp}/eval_{name}",
                ckpt_dir=f"{tmp}/models_{name}",
            )
            out[f"train_epoch_s_{name}"] = (time.perf_counter() - start) / epochs
            out[f"train_peak_gib_{name}"] = torch.cuda.max_memory_allocated() / GIB
        run(
            "inference",
            config_file=str(configs / "inference.yaml"),
            **common,
            n_ie_prompts=8,
            amp=True,
            ckpt_dir=f"{tmp}/models_ckpt_amp",
            output_dir=f"{tmp}/predictions",
        )
        out["inference_amp_files_written"] = float(len(list(Path(tmp, "predictions").rglob("*.tif*"))))
        run(
            "evaluating",
            config_file=[str(configs / "train.yaml"), str(configs / "evaluate.yaml")],
            **common,
            n_ie_prompts=8,
            amp=True,
            tracking_enabled=False,
            ckpt_dir=f"{tmp}/models_ckpt_amp",
            output_dir=f"{tmp}/evaluation",
        )
        rows = Path(tmp, "evaluation", "metrics.csv").read_text().splitlines()
        out["evaluate_amp_metric_rows"] = float(len(rows) - 1)
    return out


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("bench-gpu needs a CUDA device")
    torch.manual_seed(0)
    report: dict[str, object] = {"machine": machine(), "amp_dtype": str(AMP_DTYPE), "input_px": 1024}
    for variant in VARIANTS:
        net = PTSAM(variant, n_md_prompts=8, n_ie_prompts=8).cuda()
        # Trained prompts are not zero; random ones make the comparison touch every path.
        with torch.no_grad():
            net.ie_prompts.tokens.normal_(0, 0.02)
        image = torch.randn(1, 3, 1024, 1024, device="cuda")
        target = (torch.rand(1, 1, 1024, 1024, device="cuda") > 0.5).float()
        results: dict[str, float] = {}
        results.update(bench_encoder(net, image))
        results.update(bench_amp_agreement(net.eval(), image))
        results.update(bench_ie_training(net.train(), image, target))
        results.update(bench_cached_step(net, image, target))
        report[variant] = results
        print(f"\n{variant} at 1024 px on {torch.cuda.get_device_name(0)}", flush=True)
        for key, value in results.items():
            print(f"  {key:<32}{value:>12.4g}", flush=True)
        del net
        torch.cuda.empty_cache()
    if os.environ.get("BENCH_WORKFLOWS", "1") != "0":
        report["workflows_vit_b"] = results = bench_workflows()
        print("\nworkflows, ViT-B MD+IE, batch 4", flush=True)
        for key, value in results.items():
            print(f"  {key:<32}{value:>12.4g}", flush=True)
    out = Path(os.environ.get("BENCH_OUT", ROOT / "bench-gpu.json"))
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
