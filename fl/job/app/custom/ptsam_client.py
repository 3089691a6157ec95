"""A PTSAM site under NVIDIA FLARE (Client API): each round trains the prompts the server sends with
MONAI FL's ``MonaiAlgo`` on train.yaml + fl_train.yaml and this site's data, and sends back their
change, which is all that leaves the site (the prompt tokens and their 512-byte description).

The site's bundle, SAM weights and data come from ``PTSAM_FL_SITE_CONFIG`` (see ptsam_site.py);
``--local_epochs`` is the federation's choice, the same at every site. Each round is recorded in
<output_dir>/fl_rounds.jsonl: what was received and sent, and how many steps were trained.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import nvflare.client as flare
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from ptsam_site import append_record, digest, fit_global, make_algo, site_config, tensor_bytes

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
    records = Path(algo.train_workflow.parser.get_parsed_content("output_dir")) / "fl_rounds.jsonl"
    logger.info("%s: bundle %s, configuration %s", site, config["bundle_root"], config["path"])
    try:
        while flare.is_running():
            incoming = flare.receive()
            if incoming is None:
                break
            round_ = incoming.current_round
            started = time.time()
            received = {"received": digest(incoming.params), "received_bytes": tensor_bytes(incoming.params)}
            # refused here, before MONAI FL would reshape or skip what does not fit
            weights = fit_global(incoming.params, network, source=f"{site}: the global model of round {round_}")
            algo.train(ExchangeObject(weights=weights, weight_type=WeightType.WEIGHTS))
            update = algo.get_weights()
            if update.weight_type != WeightType.WEIGHT_DIFF:
                raise RuntimeError(f"{site}: MonaiAlgo returned {update.weight_type}, expected weight differences")
            steps = int(update.statistics[FlStatistics.NUM_EXECUTED_ITERATIONS])
            loss = last_loss(algo.trainer.state.output)
            record = {"sent_keys": sorted(update.weights), "sent_bytes": tensor_bytes(update.weights)}
            # FedAvg weighs each site by the steps it trained: by the amount of its data
            flare.send(
                FLModel(
                    params=update.weights,
                    params_type=ParamsType.DIFF,
                    current_round=round_,
                    meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps},
                )
            )
            append_record(
                records,
                {
                    "site": site,
                    "round": round_,
                    **received,
                    **record,
                    "steps": steps,
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
