"""A PTSAM site under NVIDIA FLARE (Client API): each round trains the prompts the server sends with
MONAI FL's ``MonaiAlgo`` on train.yaml + fl_train.yaml and this site's data, and sends back their
change, which is all that leaves the site (the prompt tokens and their 512-byte description),
with the site's recipe and its number of training images: the server refuses an update of
another recipe than the job's, and averages the sites' changes weighted by their training images
(not by the steps trained, which a site's batch size or epochs would inflate).

The site's bundle, SAM weights and data come from ``PTSAM_FL_SITE_CONFIG`` (see ptsam_site.py);
``--local_epochs`` is the federation's choice, the same at every site. Each round is recorded in
<output_dir>/fl_rounds.jsonl: what was received and sent, how many steps were trained, and on
how many images.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from ptsam_site import (
    append_record,
    digest,
    fit_global,
    make_algo,
    site_config,
    site_recipe,
    tensor_bytes,
    training_images,
    update_meta,
)

logger = logging.getLogger("ptsam_client")


def last_loss(output: Any) -> float | None:
    """The last iteration's loss from the trainer's output (a dict, or one per item once decollated)."""
    item = output[0] if isinstance(output, list) and output else output
    loss = item.get("loss") if isinstance(item, dict) else None
    return float(loss) if loss is not None else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_epochs", type=int, default=2)
    args = parser.parse_args()
    if args.local_epochs < 1:
        raise ValueError(f"--local_epochs must be at least 1, got {args.local_epochs}")

    from monai.fl.utils.constants import FlStatistics, WeightType
    from monai.fl.utils.exchange_object import ExchangeObject

    flare.init()
    site = flare.get_site_name()
    config = site_config(site)
    algo = make_algo(site, config, args.local_epochs)
    network = algo.trainer.network
    recipe, images = site_recipe(algo), training_images(algo)
    records = Path(algo.train_workflow.parser.get_parsed_content("output_dir")) / "fl_rounds.jsonl"
    logger.info(
        "%s: bundle %s, configuration %s, %d training images", site, config["bundle_root"], config["path"], images
    )
    try:
        while flare.is_running():
            incoming = flare.receive()
            if incoming is None:
                break
            round_ = incoming.current_round
            started = time.time()
            received = {"received": digest(incoming.params), "received_bytes": tensor_bytes(incoming.params)}
            # refused here, before MONAI FL would reshape or skip what does not fit, or this site
            # trained prompts for another recipe than the federation's
            source = f"{site}: the global model of round {round_}"
            weights = fit_global(incoming.params, network, source=source, recipe=recipe)
            algo.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS))
            update = algo.get_weights()
            if update.weight_type != WeightType.WEIGHT_DIFF:
                raise RuntimeError(f"{site}: MonaiAlgo returned {update.weight_type}, expected weight differences")
            steps = int(update.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS])
            loss = last_loss(algo.trainer.state.output)
            record = {"sent_keys": sorted(update.weights), "sent_bytes": tensor_bytes(update.weights)}
            # the server weighs each site by its training images (ptsam_server.ImageWeightedAggregator)
            meta = update_meta(steps, images, recipe)
            flare.send(FLModel(params=update.weights, params_type=ParamsType.DIFF, current_round=round_, meta=meta))
            append_record(
                records,
                {
                    "site": site,
                    "round": round_,
                    **received,
                    **record,
                    "steps": steps,
                    "training_images": images,
                    "epoch": algo.trainer.state.epoch,
                    "last_loss": loss,
                    "seconds": round(time.time() - started, 2),
                },
            )
    except Exception as err:
        logger.error("%s stops: %s", site, err)
        raise
    finally:
        algo.finalize()


if __name__ == "__main__":
    main()
