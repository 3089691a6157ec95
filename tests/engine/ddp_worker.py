"""Run by `torchrun` in test_distributed.py: trains with the multi-GPU overlay, then saves this
rank's prompts so the test can compare the ranks."""

import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from monai.bundle import ConfigParser

logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
bundle, dataset, out = (Path(a) for a in sys.argv[1:4])
sys.path.insert(0, str(bundle))
parser = ConfigParser()
parser.read_config([str(bundle / "configs" / "train.yaml"), str(bundle / "configs" / "multi_gpu_train.yaml")])
parser.update(
    {
        "bundle_root": str(bundle),
        "dataset_dir": str(dataset),
        "output_dir": str(out / "eval"),
        "ckpt_dir": str(out / "models"),
        "sam_variant": "tiny",
        "epochs": 3,
    }
)
parser.get_parsed_content("initialize")
parser.get_parsed_content("training")
trainer = parser.get_parsed_content("train#trainer")
output = trainer.state.output
torch.save(float((output[0] if isinstance(output, list) else output)["loss"]), out / f"loss_rank{dist.get_rank()}.pt")
network = parser.get_parsed_content("network")
torch.save(network.module.md_prompts.tokens.detach(), out / f"prompts_rank{dist.get_rank()}.pt")
batches = len(parser.get_parsed_content("train#dataloader"))
print(f"rank {dist.get_rank()} of {dist.get_world_size()}: {batches} batches")
parser.get_parsed_content("finalize")
