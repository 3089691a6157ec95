"""`make bench-gpu`: full-size SAM backbones on a CUDA card, each comparison side by side in one run.

Sections (BENCH_SECTIONS, comma-separated), for ViT-B, ViT-L and ViT-H at 1024 px with random
weights in the official architecture, a variant's sections one after the other, and the study
right after its own backbone's (so that a run cut short has the ViT-B figures first):
- volume: a volume's slices through PTSAM under AMP at several batch sizes vs segment-anything's
  own modules run slice by slice in fp32 (slices per second, the best batch's speed-up, agreement),
  and for ViT-B (BENCH_E2E_VARIANTS) a CT NIfTI end to end (read, window, resize, network,
  invert, write) both ways;
- training: one training step and its peak GPU memory at batch 1/4/8, MD only (on cached
  embeddings, the default) and MD+IE (activation checkpointing, the default; off at batch 1), fp32
  and AMP;
- study: `monai.bundle run study` on ViT-B, a small real-size grid on synthetic microscopy: seconds
  and peak GPU memory per cell;
- encoder: the encoder forward, stock vs ours (fused attention), fp32 and AMP, and AMP's agreement;
- cached: an MD-only step on a cached embedding vs one that recomputes the encoder;
- workflows: `monai.bundle run training` (ViT-B MD+IE, batch 4) with AMP and checkpointing off/on,
  then inference and evaluation with AMP.

Prints a table per section and writes BENCH_OUT (bench-gpu.json) after each, with the card, so a
run cut short keeps what it measured. BENCH_DEVICE=cpu with BENCH_VARIANTS=tiny runs the same
code on a CPU (tests/benchmarks): it checks the harness, its times mean nothing.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import tempfile
import time
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

from scripts.engine.inferers import SliceBatchInferer  # noqa: E402
from scripts.model.encoder import encode_image  # noqa: E402
from scripts.model.network import PTSAM  # noqa: E402
from scripts.model.sam import PROMPT_EMBED_DIM  # noqa: E402


def _ints(name: str, default: str) -> list[int]:
    return [int(v) for v in os.environ.get(name, default).split(",") if v.strip()]


def _names(name: str, default: str) -> list[str]:
    return [v.strip() for v in os.environ.get(name, default).split(",") if v.strip()]


DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cuda"))
VARIANTS = _names("BENCH_VARIANTS", "vit_b,vit_l,vit_h")
SECTIONS = _names("BENCH_SECTIONS", "volume,training,study,encoder,cached,workflows")
REPEATS = int(os.environ.get("BENCH_REPEATS", "10"))
VOLUME_SLICES = int(os.environ.get("BENCH_VOLUME_SLICES", "32"))
VOLUME_BATCHES = _ints("BENCH_VOLUME_BATCHES", "1,4,8,16,32")
TRAIN_BATCHES = _ints("BENCH_TRAIN_BATCHES", "1,4,8")
E2E_VARIANTS = _names("BENCH_E2E_VARIANTS", "vit_b")  # the CT end to end: the variants it runs for
STUDY_VARIANT = os.environ.get("BENCH_STUDY_VARIANT", "vit_b")
STUDY_SHOTS = _ints("BENCH_STUDY_SHOTS", "1,4,16")
STUDY_EPOCHS = int(os.environ.get("BENCH_STUDY_EPOCHS", "20"))
AMP_DTYPE = torch.bfloat16
GIB = 2**30
CUDA = DEVICE.type == "cuda"


def timed_ms(fn: Callable[[], object], repeats: int = REPEATS, warmup: int = 2) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, the wall clock elsewhere)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def autocast(amp: bool):
    return torch.autocast(DEVICE.type, dtype=AMP_DTYPE) if amp else nullcontext()


def reset_peak() -> None:
    if CUDA:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float:
    """Peak allocated GPU memory since ``reset_peak`` (weights included); NaN off CUDA."""
    return torch.cuda.max_memory_allocated() / GIB if CUDA else float("nan")


def mask_dice(a: torch.Tensor, b: torch.Tensor) -> float:
    """Dice of two logit maps' masks (logit > 0)."""
    a, b = a > 0, b > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()).clamp(min=1))


def rel_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    x, reference = x.float(), reference.float()
    return float((x - reference).norm() / reference.norm().clamp(min=1e-12))


# --- volume -------------------------------------------------------------------------------------


def stock_slice(net: PTSAM, image: torch.Tensor) -> torch.Tensor:
    """What a segment-anything user's loop computes for one (1, 3, S, S) slice without prompts: the
    stock encoder, the stock mask decoder (its prompt-free output) and SAM's upsampling."""
    backbone = net.backbone
    embedding = backbone.image_encoder(image)
    sparse = torch.empty(1, 0, PROMPT_EMBED_DIM, device=image.device)
    low_res, _ = backbone.mask_decoder(
        image_embeddings=embedding,
        image_pe=backbone.dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=backbone.no_mask_embedding(),
        multimask_output=False,
    )
    return net.upsample(low_res)


def stock_loop(net: PTSAM, stack: torch.Tensor) -> torch.Tensor:
    """(n, 3, S, S) slices one at a time, fp32: the baseline of the volume figures."""
    with torch.no_grad():
        return torch.cat([stock_slice(net, s[None]) for s in stack])


def bench_volume(net: PTSAM, variant: str) -> dict[str, float]:
    """A volume of VOLUME_SLICES slices: PTSAM under AMP at each batch size vs the stock fp32 loop."""
    size, n = net.img_size, VOLUME_SLICES
    volume = torch.randn(1, 3, n, size, size, device=DEVICE)  # what SamInputd makes of a volume
    stack = volume[0].transpose(0, 1)  # (n, 3, S, S)
    out: dict[str, float] = {"volume_slices": float(n)}
    # The baseline is SAM without prompts: PTSAM with no tokens must compute the same.
    bare = PTSAM(net.backbone.variant.name, n_md_prompts=0, backbone=net.backbone).to(DEVICE).eval()
    with torch.no_grad():
        out["volume_stock_rel_error_vs_promptless"] = rel_error(bare(stack[:1]), stock_loop(net, stack[:1]))
    del bare
    stock_ms = timed_ms(lambda: stock_loop(net, stack), repeats=2, warmup=1)
    out["volume_slices_per_s_stock_fp32"] = n / stock_ms * 1e3

    def ours(batch: int, amp: bool) -> torch.Tensor:
        with torch.no_grad(), autocast(amp):
            return SliceBatchInferer(batch_size=batch)(volume, net)

    best, best_batch = math.inf, 0
    for batch in VOLUME_BATCHES:
        if batch > n:
            continue
        reset_peak()
        try:
            ms = timed_ms(lambda b=batch: ours(b, True), repeats=2, warmup=1)
        except torch.OutOfMemoryError:
            ms = float("nan")
        out[f"volume_slices_per_s_amp_b{batch}"] = n / ms * 1e3
        out[f"volume_peak_gib_amp_b{batch}"] = peak_gib()
        if ms < best:
            best, best_batch = ms, batch
    out["volume_best_batch"] = float(best_batch)
    out["volume_speedup_vs_stock"] = stock_ms / best
    # Agreement: fp32 batched must equal fp32 one by one (slice order, batching); AMP close to fp32.
    reference = ours(1, False)
    batched = ours(best_batch, False)
    fast = ours(best_batch, True).float()
    out["volume_fp32_batched_rel_error"] = rel_error(batched, reference)
    out["volume_amp_rel_error"] = rel_error(fast, reference)
    out["volume_amp_mask_dice_vs_fp32"] = mask_dice(fast, reference)
    if variant in E2E_VARIANTS:
        out.update(bench_volume_end_to_end(net, best_batch))
    return out


def bench_volume_end_to_end(net: PTSAM, batch: int) -> dict[str, float]:
    """A 512 x 512 x VOLUME_SLICES CT NIfTI through the inference transforms, read to written, with
    the network on the GPU: PTSAM under AMP at ``batch`` vs the stock fp32 loop."""
    import nibabel as nib
    import numpy as np
    from monai.transforms import Compose

    from scripts.data.postprocess import LogitsToLabeld, WriteLabeld
    from scripts.data.transforms import InvertSamInputd, LoadImageAnyd, SamChannelsd, SamInputd, SamIntensityd

    def stock(images: torch.Tensor) -> torch.Tensor:
        return stock_loop(net, images)

    def ours(images: torch.Tensor) -> torch.Tensor:
        with autocast(True):
            return net(images).float()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ct.nii.gz"
        hu = np.random.default_rng(1).normal(0, 300, (512, 512, VOLUME_SLICES)).astype(np.int16)
        nib.save(nib.Nifti1Image(hu, np.diag([0.8, 0.8, 2.5, 1.0])), path)
        pre = Compose(
            [
                LoadImageAnyd("image"),
                SamIntensityd("image", mode="window"),
                SamChannelsd("image"),
                SamInputd("image", net.img_size),
            ]
        )
        post = Compose([InvertSamInputd("pred"), LogitsToLabeld("pred"), WriteLabeld("pred", output_dir=tmp)])

        def run(network: Callable[[torch.Tensor], torch.Tensor], inferer: SliceBatchInferer) -> float:
            start = time.perf_counter()
            with torch.no_grad():
                d = pre({"image": str(path)})
                d["pred"] = inferer(d["image"].as_tensor()[None].to(DEVICE), network)[0]
                post(d)
            if CUDA:
                torch.cuda.synchronize()
            return time.perf_counter() - start

        paths = {
            "stock": (stock, SliceBatchInferer(batch_size=VOLUME_SLICES)),
            "ours": (ours, SliceBatchInferer(batch)),
        }
        seconds: dict[str, list[float]] = {k: [] for k in paths}
        for _ in range(3):  # the first round warms up; interleaved so that drift is shared
            for key, (network, inferer) in paths.items():
                seconds[key].append(run(network, inferer))
    stock_s, ours_s = (statistics.median(seconds[k][1:]) for k in ("stock", "ours"))
    return {
        "volume_e2e_s_stock_fp32": stock_s,
        "volume_e2e_s_amp": ours_s,
        "volume_e2e_slices_per_s_amp": VOLUME_SLICES / ours_s,
        "volume_e2e_speedup_vs_stock": stock_s / ours_s,
    }


# --- training -----------------------------------------------------------------------------------


def train_step(
    net: PTSAM, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, amp: bool, embedded: bool = False
) -> None:
    with autocast(amp):
        logits = net(x, embedded=embedded)
    loss = F.binary_cross_entropy_with_logits(logits.float(), y)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def bench_training(net: PTSAM) -> dict[str, float]:
    """One step at each batch size: MD only on cached embeddings, MD+IE through the encoder."""
    md_only = PTSAM(net.backbone.variant.name, n_md_prompts=net.md_prompts.n, backbone=net.backbone)
    md_only = md_only.to(DEVICE).train()
    size = net.img_size
    out: dict[str, float] = {}
    for batch in TRAIN_BATCHES:
        images = torch.randn(batch, 3, size, size, device=DEVICE)
        target = (torch.rand(batch, 1, size, size, device=DEVICE) > 0.5).float()
        with torch.no_grad():
            embeddings = md_only.encode(images)
        setups: list[tuple[str, PTSAM, bool, torch.Tensor, bool]] = []
        for amp in (False, True):
            precision = "amp" if amp else "fp32"
            setups.append((f"md_{precision}", md_only, amp, embeddings, True))
            setups.append((f"md_ie_{precision}", net, amp, images, False))
            if batch == 1:
                setups.append((f"md_ie_nockpt_{precision}", net, amp, images, False))
        for name, model, amp, x, embedded in setups:
            if model is net:  # MD+IE: checkpointing on (the default) unless the name says not
                net.activation_checkpointing = "nockpt" not in name
            optimiser = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            reset_peak()

            def step(m=model, o=optimiser, a=amp, x=x, y=target, e=embedded) -> None:
                train_step(m, o, x, y, a, e)

            try:
                out[f"train_ms_{name}_b{batch}"] = timed_ms(step, repeats=3, warmup=1)
                out[f"train_peak_gib_{name}_b{batch}"] = peak_gib()
            except torch.OutOfMemoryError:
                out[f"train_ms_{name}_b{batch}"] = out[f"train_peak_gib_{name}_b{batch}"] = float("nan")
            del optimiser
    net.activation_checkpointing = True
    return out


# --- study --------------------------------------------------------------------------------------


def bench_study(variant: str) -> dict[str, float]:
    """The study command on a real-size backbone (random weights: timing only): per cell seconds,
    seconds per epoch and peak GPU memory, for MD, MD+IE (8 + 8 tokens) and the decoder baseline."""
    from monai.bundle import run

    from scripts.demo.synthetic import generate

    configs = ROOT / "bundle" / "configs"
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(
            generate(tmp, seed=0, n_train=max(STUDY_SHOTS), n_val=4, n_test=8, modalities="microscopy")["microscopy"]
        )
        start = time.perf_counter()
        run(
            "study",
            config_file=[str(configs / "train.yaml"), str(configs / "study.yaml")],
            bundle_root=str(ROOT / "bundle"),
            dataset_dir=str(data.parent),
            output_dir=f"{tmp}/eval",
            sam_variant=variant,
            allow_random_weights=True,  # timing only: no weights on the benchmark machine
            grid_shots=STUDY_SHOTS,
            grid_md_prompts=[8],
            grid_ie_prompts=[0, 8],
            grid_seeds=[0],
            decoder_baseline=True,
            epochs=STUDY_EPOCHS,
            early_stop_patience=0,  # random weights never improve: every cell runs its full budget
            amp=CUDA,
            tracking_enabled=False,
        )
        out["study_total_s"] = time.perf_counter() - start
        for path in sorted(Path(tmp, "eval", "study", "cells").glob("*/result.json")):
            cell = json.loads(path.read_text())
            out[f"study_s_{cell['cell']}"] = float(cell["seconds"])
            out[f"study_s_per_epoch_{cell['cell']}"] = float(cell["seconds"]) / max(int(cell["epochs_run"]), 1)
            peak = cell.get("peak_gpu_gib")
            out[f"study_peak_gib_{cell['cell']}"] = float(peak) if peak is not None else float("nan")
        out["study_cells"] = float(len(list(Path(tmp, "eval", "study", "cells").glob("*/result.json"))))
        out["study_csv_rows"] = float(len(Path(tmp, "eval", "study", "study.csv").read_text().splitlines()) - 1)
    return out


# --- encoder and cache (the first GPU round) ----------------------------------------------------


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
        "encoder_ms_stock_fp32": timed_ms(stock(False)),
        "encoder_ms_ours_fp32": timed_ms(ours(False)),
        "encoder_ms_stock_amp": timed_ms(stock(True)),
        "encoder_ms_ours_amp": timed_ms(ours(True)),
        "encoder_max_abs_diff_fp32": float((fused - reference).abs().max()),
        "encoder_max_abs_diff_fp32_no_tf32": strict,
        "encoder_output_scale": float(reference.abs().max()),
        "encoder_amp_rel_error": rel_error(fused_amp, reference),
    }
    out["encoder_time_ratio_fp32"] = out["encoder_ms_ours_fp32"] / out["encoder_ms_stock_fp32"]
    out["encoder_time_ratio_amp"] = out["encoder_ms_ours_amp"] / out["encoder_ms_stock_amp"]
    with torch.no_grad():
        ref = net(image)
        with autocast(True):
            low = net(image).float()
    out["amp_logit_max_abs_diff"] = float((low - ref).abs().max())
    out["amp_logit_scale"] = float(ref.abs().max())
    out["amp_mask_dice_vs_fp32"] = mask_dice(low, ref)
    return out


def bench_cached_step(net: PTSAM, image: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """An MD-only step on a cached embedding vs one that recomputes the encoder."""
    optimiser = torch.optim.AdamW([net.md_prompts.tokens], lr=1e-3)
    with torch.no_grad():
        embedding = net.encode(image)

    def recompute() -> None:
        with torch.no_grad():
            e = net.encode(image)
        train_step(net, optimiser, e, target, False, embedded=True)

    cached = timed_ms(lambda: train_step(net, optimiser, embedding, target, False, embedded=True))
    full = timed_ms(recompute)
    return {"md_step_ms_cached": cached, "md_step_ms_recompute": full, "cache_step_speedup": full / cached}


def bench_workflows(variant: str = "vit_b", epochs: int = 2) -> dict[str, float]:
    """The bundle's own training and inference workflows, as a user runs them, on the GPU."""
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
            reset_peak()
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
            out[f"train_peak_gib_{name}"] = peak_gib()
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


# --- the run ------------------------------------------------------------------------------------


def _print(title: str, results: dict[str, float]) -> None:
    print(f"\n{title}", flush=True)
    for key, value in results.items():
        print(f"  {key:<44}{value:>12.4g}", flush=True)


def main() -> None:
    if CUDA and not torch.cuda.is_available():
        sys.exit("bench-gpu needs a CUDA device (BENCH_DEVICE=cpu runs the harness on a CPU)")
    unknown = set(SECTIONS) - {"volume", "training", "study", "encoder", "cached", "workflows"}
    if unknown:
        sys.exit(f"unknown BENCH_SECTIONS {sorted(unknown)}")
    torch.manual_seed(0)
    card = torch.cuda.get_device_name(0) if CUDA else f"CPU ({machine()['cpu']})"
    report: dict[str, object] = {"machine": machine(), "device": card, "amp_dtype": str(AMP_DTYPE)}
    out = Path(os.environ.get("BENCH_OUT", ROOT / "bench-gpu.json"))

    def record(key: str, title: str, results: dict[str, float]) -> None:
        report[key] = results
        _print(title, results)
        out.write_text(json.dumps(report, indent=2))  # after each section: a cut-short run keeps it

    def study() -> None:
        if "study" in SECTIONS:
            start = time.perf_counter()
            title = f"study: {STUDY_VARIANT}, shots {STUDY_SHOTS}, {STUDY_EPOCHS} epochs a cell"
            record(f"study_{STUDY_VARIANT}", title, bench_study(STUDY_VARIANT))
            print(f"[study: {time.perf_counter() - start:.0f} s]", flush=True)

    per_variant = [s for s in SECTIONS if s in ("volume", "training", "encoder", "cached")]
    for variant in VARIANTS if per_variant else []:
        start = time.perf_counter()
        net = PTSAM(variant, n_md_prompts=8, n_ie_prompts=8).to(DEVICE)
        # Trained prompts are not zero; random ones make the comparisons touch every path.
        with torch.no_grad():
            net.ie_prompts.tokens.normal_(0, 0.02)
        size = net.img_size
        print(f"\n[{variant} built in {time.perf_counter() - start:.0f} s]", flush=True)
        image = torch.randn(1, 3, size, size, device=DEVICE)
        target = (torch.rand(1, 1, size, size, device=DEVICE) > 0.5).float()
        for section in per_variant:
            start = time.perf_counter()
            if section == "volume":
                results = bench_volume(net.eval(), variant)
            elif section == "training":
                results = bench_training(net.train())
            elif section == "encoder":
                results = bench_encoder(net.eval(), image)
            else:
                results = bench_cached_step(net.train(), image, target)
            record(f"{section}_{variant}", f"{section}: {variant} at {size} px on {card}", results)
            print(f"[{section}: {time.perf_counter() - start:.0f} s]", flush=True)
        del net
        if CUDA:
            torch.cuda.empty_cache()
        if variant == STUDY_VARIANT:  # the study's backbone is done: its cells next, before larger ones
            study()
    if STUDY_VARIANT not in VARIANTS or not per_variant:
        study()
    if "workflows" in SECTIONS:
        record("workflows_vit_b", "workflows: ViT-B MD+IE, batch 4", bench_workflows())
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
