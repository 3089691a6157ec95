"""Make the PTSAM federated job, and for the simulator its sites: data, configuration, SAM weights.

    python fl/prepare.py job OUT --sam_variant vit_b --sam_checkpoint sam_vit_b_01ec64.pth \
        [--rounds 20] [--clients 4] [--local_epochs 2] \
        [--set intensity=window --set a_min=-100 --set "classes=[1]" ...]   # a job for `nvflare job submit`
    python fl/prepare.py simulation WORKDIR                 # what `make fl` runs, on synthetic data

A job is fl/job with the initial global model added: ``app/custom/initial_prompts.pt``, the
prompts of a fresh PTSAM on the given SAM weights. Its ``ptsam_meta`` names those weights (by
fingerprint), the prompt counts and the classes, and its ``ptsam_recipe`` the federation's recipe
(train.yaml's defaults, with the knobs ``--set`` gives: intensity, classes, layout, ...; the image
size follows the variant), so a site set up with anything else refuses the first round instead of
training prompts for another network, or on images prepared otherwise, and the server refuses
such a site's update. The server averages the sites' changes weighted by their training images.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

FL = Path(__file__).resolve().parent
JOB = FL / "job"
BUNDLE = FL.parent / "bundle"
CONFIGS = ["configs/train.yaml", "configs/fl_train.yaml"]
SITES = ("site-1", "site-2")
INITIAL = "app/custom/initial_prompts.pt"


def _bundle_on_path(bundle: Path = BUNDLE) -> None:
    if str(bundle) not in sys.path:
        sys.path.insert(0, str(bundle))


def initial_prompts(path: Path, overrides: dict[str, Any], seed: int = 0, bundle: Path = BUNDLE) -> Path:
    """The prompts of the network train.yaml + fl_train.yaml build with ``overrides``, saved to ``path``
    with the recipe they give: the federation's, which every site must train with."""
    _bundle_on_path(bundle)
    from monai.bundle import ConfigParser

    from scripts.model.prompt_file import save_prompts

    parser = ConfigParser()
    parser.read_config([str(bundle / c) for c in CONFIGS])
    parser.update({"bundle_root": str(bundle), **overrides})
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # the tiny generalist is not one of Meta's checkpoints
        warnings.simplefilter("ignore", UserWarning)
        network = parser.get_parsed_content("network_def")
    return save_prompts(network, path, recipe=parser.get_parsed_content("recipe"))


def make_job(
    out: Path,
    overrides: dict[str, Any],
    rounds: int | None = None,
    clients: int | None = None,
    local_epochs: int | None = None,
    seed: int = 0,
) -> Path:
    """fl/job copied to ``out`` with its initial prompts, and the given rounds, clients and epochs."""
    for name, value in (("rounds", rounds), ("clients", clients), ("local_epochs", local_epochs)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    out = Path(out).resolve()
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(JOB, out, ignore=shutil.ignore_patterns("__pycache__"))
    server = out / "app/config/config_fed_server.json"
    config = json.loads(server.read_text())
    args = config["workflows"][0]["args"]
    args["num_rounds"] = rounds or args["num_rounds"]
    args["num_clients"] = clients or args["num_clients"]
    server.write_text(json.dumps(config, indent=4) + "\n")
    meta = json.loads((out / "meta.json").read_text())
    meta["min_clients"] = args["num_clients"]
    (out / "meta.json").write_text(json.dumps(meta, indent=4) + "\n")
    if local_epochs is not None:
        client = out / "app/config/config_fed_client.json"
        config = json.loads(client.read_text())
        config["executors"][0]["executor"]["args"]["task_script_args"] = f"--local_epochs {local_epochs}"
        client.write_text(json.dumps(config, indent=4) + "\n")
    initial_prompts(out / INITIAL, overrides, seed)
    return out


def make_simulation(workdir: Path, sam_checkpoint: Path | None = None, device: str = "cpu") -> dict[str, Path]:
    """Everything `nvflare simulator` needs in ``workdir``: two sites with different synthetic
    microscopy images, a held-out test set neither has, each site's configuration, and the job
    on the tiny generalist SAM (pretrained once and cached when ``sam_checkpoint`` is None)."""
    _bundle_on_path()
    from scripts.demo.generalist import ensure_generalist
    from scripts.demo.synthetic import generate

    workdir = Path(workdir).resolve()
    sam = Path(sam_checkpoint).resolve() if sam_checkpoint else ensure_generalist(seed=0)
    backbone = {"sam_variant": "tiny", "sam_checkpoint": str(sam), "device": f"$torch.device('{device}')"}
    data = workdir / "data"
    shutil.rmtree(data, ignore_errors=True)
    for seed, site in enumerate(SITES, start=1):  # another seed: other images at each site
        generate(str(data / site), seed=seed, n_train=6, n_val=2, n_test=0, modalities="microscopy")
    generate(str(data / "held_out"), seed=len(SITES) + 1, n_train=1, n_val=1, n_test=4, modalities="microscopy")
    for site in SITES:
        folder = workdir / "sites" / site
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        overrides = {
            **backbone,
            "dataset_dir": str(data / site / "microscopy"),
            "output_dir": str(folder / "eval"),
            "ckpt_dir": str(folder / "models"),
        }
        (folder / "site.json").write_text(json.dumps({"bundle_root": str(BUNDLE), "overrides": overrides}, indent=2))
    job = make_job(workdir / "job", backbone)
    return {
        "job": job,
        "site_config": workdir / "sites" / "{site}" / "site.json",
        "held_out": data / "held_out" / "microscopy",
        "sam_checkpoint": sam,
    }


def recipe_knobs(settings: list[str], parser: argparse.ArgumentParser) -> dict[str, Any]:
    """``--set KNOB=VALUE`` as overrides of recipe knobs, each value read as YAML."""
    import yaml

    _bundle_on_path()
    from scripts.engine.recipe import KNOBS

    settable = [k for k in KNOBS if k != "image_size"]  # the size follows --sam_variant
    knobs = {}
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep or key not in settable:
            parser.error(f"--set {setting}: give KNOB=VALUE with KNOB one of {', '.join(settable)}")
        knobs[key] = yaml.safe_load(value)
    return knobs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    job = sub.add_parser("job", help="a job for a real federation")
    job.add_argument("out", type=Path)
    job.add_argument("--sam_variant", required=True, help="vit_b, vit_l, vit_h (or tiny)")
    job.add_argument("--sam_checkpoint", required=True, type=Path, help="the SAM weights every site uses")
    job.add_argument("--n_md_prompts", type=int, default=8)
    job.add_argument("--n_ie_prompts", type=int, default=0)
    job.add_argument("--num_classes", type=int, default=1)
    job.add_argument("--rounds", type=int)
    job.add_argument("--clients", type=int)
    job.add_argument("--local_epochs", type=int)
    job.add_argument("--seed", type=int, default=0)
    job.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KNOB=VALUE",
        help="a recipe knob of the federation (YAML value), e.g. intensity=window, 'classes=[1, 2]'",
    )
    sim = sub.add_parser("simulation", help="a job and two synthetic sites for the simulator")
    sim.add_argument("workdir", type=Path)
    sim.add_argument("--sam_checkpoint", type=Path, help="a tiny SAM (default: the cached generalist)")
    args = parser.parse_args(argv)
    if args.command == "job":
        if not args.sam_checkpoint.is_file():
            parser.error(f"--sam_checkpoint {args.sam_checkpoint}: no such file")
        overrides = {
            "sam_variant": args.sam_variant,
            "sam_checkpoint": str(args.sam_checkpoint.resolve()),
            "n_md_prompts": args.n_md_prompts,
            "n_ie_prompts": args.n_ie_prompts,
            "num_classes": args.num_classes,
            **recipe_knobs(args.set, parser),
        }
        print(make_job(args.out, overrides, args.rounds, args.clients, args.local_epochs, args.seed))
    else:
        made = make_simulation(args.workdir, args.sam_checkpoint)
        print(json.dumps({k: str(v) for k, v in made.items()}, indent=2))


if __name__ == "__main__":
    main()
