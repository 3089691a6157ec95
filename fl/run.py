"""A federated PTSAM run on NVIDIA FLARE's simulator, scored on images neither site has (`make fl`).

    python fl/run.py [--workdir build/fl]

1. ``fl/prepare.py simulation``: two sites (site-1, site-2) with different synthetic microscopy
   images, a held-out test set, and the job (fl/job with its initial prompts) on the tiny SAM;
2. ``nvflare simulator WORKDIR/job -w WORKDIR/workspace -n 2 -t 2``, each site's configuration
   found through ``PTSAM_FL_SITE_CONFIG=WORKDIR/sites/{site}/site.json``;
3. the held-out Dice of the global prompts after each round, in WORKDIR/summary.json.

The server's record of the rounds is in WORKDIR/workspace/server/simulate_job/app_server/ptsam_rounds,
each site's in WORKDIR/sites/<site>/eval/fl_rounds.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from prepare import BUNDLE, CONFIGS, SITES, _bundle_on_path, make_simulation  # noqa: E402

SERVER_RECORDS = "server/simulate_job/app_server/ptsam_rounds"


def nvflare_command() -> list[str]:
    """The `nvflare` command of this Python's environment (the one `make fl-setup` installed it in)."""
    beside = Path(sys.executable).parent / "nvflare"
    found = str(beside) if beside.is_file() else shutil.which("nvflare")
    if not found:
        raise SystemExit("nvflare is not installed in this environment: `make fl-setup` (pip install -e '.[fl]')")
    return [found]


def simulate(job: Path, workspace: Path, site_config: Path, log: Path, timeout: float) -> None:
    """FLARE's simulator on ``job``: a server and the sites on loopback, as `nvflare simulator` runs them,
    each site in a process of its own (``-t`` as many as sites)."""
    shutil.rmtree(workspace, ignore_errors=True)
    env = {**os.environ, "PTSAM_FL_SITE_CONFIG": str(site_config)}
    command = [*nvflare_command(), "simulator", str(job), "-w", str(workspace)]
    command += ["-n", str(len(SITES)), "-t", str(len(SITES))]
    print("$", " ".join(command), flush=True)
    with log.open("w") as out:
        done = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    if done.returncode != 0:
        # the errors say why (a site's refusal first), the log's tail only how the job was aborted
        errors = dict.fromkeys(line for line in log.read_text(errors="replace").splitlines() if " - ERROR - " in line)
        shown = "\n".join(list(errors)[:12])
        raise SystemExit(f"nvflare simulator failed (exit {done.returncode}); its log: {log}\n{shown}")


def held_out_dice(files: list[Path], dataset: Path, sam_checkpoint: Path, out: Path) -> list[float]:
    """Mean Dice of each prompt file on the held-out test images, with the bundle's own evaluator."""
    _bundle_on_path()
    from monai.bundle import ConfigParser

    from scripts.data.datasets import load_datalist
    from scripts.model.prompt_file import read_prompt_file

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / CONFIGS[0]))
    parser.update(
        {
            "bundle_root": str(BUNDLE),
            "dataset_dir": str(dataset),
            "output_dir": str(out),
            "sam_variant": "tiny",
            "sam_checkpoint": str(sam_checkpoint),
            "device": "$torch.device('cpu')",
            "tracking_enabled": False,
        }
    )
    parser["validate#dataset#data"] = load_datalist(dataset, "test")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        evaluator = parser.get_parsed_content("validate#evaluator")
    network = parser.get_parsed_content("network")
    scores = []
    for path in files:
        network.load_state_dict(read_prompt_file(path))  # refuses prompts of another network
        evaluator.run()
        scores.append(float(evaluator.state.metrics["val_mean_dice"]))
    return scores


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run(workdir: Path, timeout: float = 1800, sam_checkpoint: Path | None = None) -> dict:
    workdir = Path(workdir).resolve()
    started = time.time()
    made = make_simulation(workdir, sam_checkpoint)
    prepared = time.time()
    workspace = workdir / "workspace"
    simulate(made["job"], workspace, made["site_config"], workdir / "simulator.log", timeout)
    simulated = time.time()
    records = workspace / SERVER_RECORDS
    rounds = read_jsonl(records / "rounds.jsonl")
    files = [records / r["file"] for r in rounds]
    dice = held_out_dice(files, made["held_out"], made["sam_checkpoint"], workdir / "score")
    summary = {
        "rounds": len(rounds) - 1,
        "held_out_dice": dice,  # index k: the global prompts after k rounds
        "contributors": [r["contributors"] for r in rounds[1:]],
        "global_bytes": rounds[-1]["bytes"],
        "sent_bytes": {
            site: [r["sent_bytes"] for r in read_jsonl(workdir / "sites" / site / "eval" / "fl_rounds.jsonl")]
            for site in SITES
        },
        "global_models": [str(f) for f in files],
        "prepare_seconds": round(prepared - started, 1),
        "simulator_seconds": round(simulated - prepared, 1),
        "seconds": round(time.time() - started, 1),
    }
    (workdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("build/fl"))
    parser.add_argument("--timeout", type=float, default=1800, help="seconds the simulator may take")
    parser.add_argument("--sam_checkpoint", type=Path, help="a tiny SAM (default: the cached generalist)")
    args = parser.parse_args(argv)
    summary = run(args.workdir, args.timeout, args.sam_checkpoint)
    for k, d in enumerate(summary["held_out_dice"]):
        who = "initial prompts" if k == 0 else "averaged from " + ", ".join(summary["contributors"][k - 1])
        print(f"after round {k}: held-out Dice {d:.3f}  ({who})")
    print(f"{summary['global_bytes']} bytes of prompts per model; {summary['seconds']} s; {args.workdir}/summary.json")


if __name__ == "__main__":
    main()
