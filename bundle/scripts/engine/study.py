"""The paper's few-shot study on one dataset: a grid of trainings, each scored on the same
held-out test images (``configs/study.yaml``, ``docs/study.md``).

A cell is one training as train.yaml trains: ``shots`` training cases (the first of a seeded
shuffle of the training split, so the cells of one seed see the same cases, nested as ``shots``
grows), ``n_md_prompts`` mask-decoder tokens and ``n_ie_prompts`` image-encoder tokens per block
(0: MD only), one seed; or the baseline, SAM's whole mask decoder fine-tuned with the same data,
budget and selection rule. Every cell chooses its best epoch on the same validation split and is
scored on the test split, which no cell trains or selects on.

Each cell is parsed afresh from ``cell_config`` (train.yaml + study.yaml) with the study's knobs
and its own, in this process; the cells share one SAM backbone, built by the first, and the
embedding cache. A cell writes ``<study_dir>/cells/<cell>/result.json`` when it is
done, so a rerun skips it; the study's knobs are kept in ``study.json`` beside them, with the
MLflow parent run, and a rerun with other knobs is refused before any work.
"""

from __future__ import annotations

import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from ..common.files import atomic_torch_save, atomic_write, lock_folder
from ..common.flags import flag
from ..common.options import RULES, OptionError
from ..model.prompt_file import load_prompts
from ..model.prompts import trainable_parameters
from .distributed import unwrap
from .handlers import on_validation, remembered
from .tracking import Terminated, TrackingRun

logger = logging.getLogger(__name__)

TUNES = ("prompts", "decoder")
DECODER_FILE = "decoder_best.pt"
DECODER_FORMAT = "ptsam-decoder-baseline/1"
# Knobs that change where or how fast a study runs, not its results: a rerun may change them.
_FREE_KNOBS = (
    "bundle_root", "output_dir", "device", "tracking_enabled", "tracking_uri", "experiment_name", "cache_dir",
    "cache_ram_mb", "resume",
)  # fmt: skip


def tune_network(network: torch.nn.Module, tune: str = "prompts") -> torch.nn.Module:
    """``prompts``: PTSAM as built, only its prompt tokens train. ``decoder``: SAM's mask decoder
    trains as well (the baseline). The tokens stay, so that several classes remain distinct (SAM's
    own output tokens are shared by every class) and the forward pass is PTSAM's."""
    if tune not in TUNES:
        raise ValueError(f"tune must be one of {', '.join(TUNES)}, got {tune!r}")
    if tune == "decoder":
        unwrap(network).backbone.mask_decoder.requires_grad_(True)
    return network


def save_decoder(network: torch.nn.Module, path: str | Path) -> Path:
    """SAM's tuned mask decoder with the prompts, in a file no prompt loader takes for ``model.pt``."""
    net = unwrap(network)
    decoder = {k: v.detach().cpu().clone() for k, v in net.backbone.mask_decoder.state_dict().items()}
    return atomic_torch_save({"format": DECODER_FORMAT, "mask_decoder": decoder, "prompts": net.state_dict()}, path)


def load_decoder(network: torch.nn.Module, path: str | Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or state.get("format") != DECODER_FORMAT:
        raise ValueError(f"{path} is not a decoder-baseline file ({DECODER_FORMAT})")
    net = unwrap(network)
    net.backbone.mask_decoder.load_state_dict(state["mask_decoder"])
    net.load_state_dict(state["prompts"])  # checks the prompts' network as load_prompts does


class BestDecoderSaver:
    """The baseline's ``BestPromptSaver``: the same rule (best validation ``metric_name``; the
    final state when no validation ran), but ``save_decoder``'s file."""

    def __init__(
        self, network: torch.nn.Module, path: str | Path, evaluator: Engine, metric_name: str = "val_mean_dice"
    ):
        self.network, self.path, self.evaluator, self.metric_name = network, Path(path), evaluator, metric_name

    def attach(self, trainer: Engine) -> None:
        remembered(trainer, best_decoder_metric=-math.inf, best_decoder_epoch=0)
        on_validation(trainer, self.evaluator, self.validated)
        trainer.add_event_handler(Events.COMPLETED, self.save_unvalidated)

    def validated(self, trainer: Engine, metrics: Mapping[str, Any]) -> None:
        value = float(metrics[self.metric_name])
        if value > trainer.state.best_decoder_metric:
            trainer.state.best_decoder_metric, trainer.state.best_decoder_epoch = value, int(trainer.state.epoch)
            save_decoder(self.network, self.path)

    def save_unvalidated(self, trainer: Engine) -> None:
        if trainer.state.best_decoder_epoch == 0:
            save_decoder(self.network, self.path)


@dataclass(frozen=True)
class Cell:
    """One training of the grid."""

    shots: int
    n_md_prompts: int
    n_ie_prompts: int
    seed: int
    tune: str = "prompts"

    @property
    def setting(self) -> str:
        if self.tune == "decoder":
            return "decoder"
        return "MD+IE" if self.n_ie_prompts else "MD"

    @property
    def name(self) -> str:
        tokens = f"md{self.n_md_prompts}" + ("_decoder" if self.tune == "decoder" else f"_ie{self.n_ie_prompts}")
        return f"shots{self.shots}_{tokens}_seed{self.seed}"


def _list_problems(name: str, values: Any, low: int | None) -> list[str]:
    allowed = "a non-empty list of distinct integers" + (f" >= {low}" if low is not None else "")
    ok = isinstance(values, (list, tuple)) and len(values) > 0
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) and (low is None or v >= low) for v in values)
    if not ok or len(set(values)) != len(values):
        return [f"--{name} {values!r}: expected {allowed}"]
    return []


def _grid_problems(
    n_training: int, shots: Any, md_prompts: Any, ie_prompts: Any, seeds: Any, num_classes: Any = 1
) -> list[str]:
    """What makes the grid impossible, each as '--knob value: why'."""
    shots_bad = _list_problems("grid_shots", shots, 1)
    md_bad, ie_bad = _list_problems("grid_md_prompts", md_prompts, 0), _list_problems("grid_ie_prompts", ie_prompts, 0)
    found = shots_bad[:]
    if not shots_bad and max(shots) > n_training:
        found.append(
            f"--grid_shots {list(shots)!r}: {max(shots)} shots, but the training split has {n_training} "
            "case(s) (after the validation and test cases are held out)"
        )
    found += md_bad + ie_bad + _list_problems("grid_seeds", seeds, None)
    if not (md_bad or ie_bad) and 0 in md_prompts and 0 in ie_prompts:
        found.append(
            f"--grid_md_prompts {list(md_prompts)!r} with --grid_ie_prompts {list(ie_prompts)!r}: "
            "the cell with 0 and 0 has no prompt tokens, nothing to learn"
        )
    if not md_bad and 0 in md_prompts and isinstance(num_classes, int) and num_classes > 1:
        found.append(
            f"--grid_md_prompts {list(md_prompts)!r} with --num_classes {num_classes}: the classes differ only by "
            "their mask-decoder tokens; the cells with 0 would give every class the same mask"
        )
    return found


def _baseline_problems(knobs: Mapping[str, Any], n_md_prompts: int) -> list[str]:
    found = []
    lr = knobs.get("decoder_learning_rate")
    if RULES["learning_rate"](lr):
        found.append(f"--decoder_learning_rate {lr!r}: expected {RULES['learning_rate'](lr)}")
    classes = knobs.get("num_classes", 1)
    if n_md_prompts == 0 and classes != 1:
        found.append(
            f"--n_md_prompts 0 with --num_classes {classes}: the decoder baseline's classes differ only by their "
            "prompt tokens; give it some, or set --decoder_baseline false"
        )
    return found


class Study:
    """The grid, its cells run one after the other, and what they add up to (``study_report``)."""

    def __init__(
        self,
        study_dir: str | Path,
        cell_config: Sequence[str],
        knobs: Mapping[str, Any],
        training: Sequence[Mapping[str, Any]],
        shots: Sequence[int] = (1, 2, 4, 8, 16),
        md_prompts: Sequence[int] = (1, 2, 4, 8, 16, 32),
        ie_prompts: Sequence[int] = (0, 8),
        seeds: Sequence[int] = (0, 1, 2),
        decoder_baseline: bool = True,
        decoder_md_prompts: int = 8,
        tracking: TrackingRun | None = None,
    ):
        self.study_dir = Path(study_dir)
        self.cell_config = [str(f) for f in cell_config]
        self.knobs = dict(knobs)
        self.training = sorted((dict(t) for t in training), key=lambda t: str(t["image"]))
        self.tracking = tracking
        found = _grid_problems(len(self.training), shots, md_prompts, ie_prompts, seeds, self.knobs.get("num_classes"))
        try:
            self.decoder_baseline = flag(decoder_baseline)
        except ValueError:
            self.decoder_baseline = False
            found.append(f"--decoder_baseline {decoder_baseline!r}: expected true or false")
        if self.decoder_baseline:
            found += _baseline_problems(self.knobs, decoder_md_prompts)
        if found:
            raise OptionError("invalid study grid:\n  " + "\n  ".join(found))
        self.shots, self.seeds = [int(s) for s in shots], [int(s) for s in seeds]
        self.md_prompts, self.ie_prompts = [int(n) for n in md_prompts], [int(n) for n in ie_prompts]
        self.decoder_md_prompts = int(decoder_md_prompts)
        self._record = self._read_record()
        # SAM, built by the first cell as train.yaml says and lent to the others (a ViT-H takes seconds
        # to build and load), with its decoder's weights as loaded: the baseline trains them in place.
        self._backbone: torch.nn.Module | None = None
        self._decoder_as_loaded: dict[str, torch.Tensor] = {}

    def cells(self) -> list[Cell]:
        """Seed by seed, and within a seed by shots: an interrupted study has whole seeds done."""
        cells = []
        for seed in self.seeds:
            for k in self.shots:
                for ie in self.ie_prompts:
                    cells += [Cell(k, md, ie, seed) for md in self.md_prompts if md or ie]
                if self.decoder_baseline:
                    cells.append(Cell(k, self.decoder_md_prompts, 0, seed, "decoder"))
        return cells

    def shot_cases(self, shots: int, seed: int) -> list[dict]:
        """The first ``shots`` training cases after a shuffle by ``seed``: nested as ``shots`` grows."""
        order = list(self.training)
        random.Random(seed).shuffle(order)
        return [dict(t) for t in order[:shots]]

    def claim(self) -> None:
        """The study folder is this run's until it ends: two studies in one folder would train
        the same cells and write the same files."""
        try:
            lock_folder(self.study_dir, "a study")
        except RuntimeError as err:
            raise RuntimeError(f"study_dir={self.study_dir} is in use by another study still running") from err

    def run(self) -> Path:
        """Every cell not done yet, then the CSV and the plots; returns the CSV's path."""
        from .study_report import summarize, write_csv, write_plots

        cells = self.cells()
        self.study_dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.study_dir / "study.json", self._record)
        parent = self._start_parent(self._record)
        previous_sigterm = _raise_on_sigterm()
        results = []
        try:
            for i, cell in enumerate(cells, 1):
                done = self._finished(cell)
                if done is not None:
                    message = "study %d/%d %s: done before, test Dice %.4f"
                    logger.info(message, i, len(cells), cell.name, done["test_dice"])
                else:
                    done = self._run_cell(cell, parent)
                    logger.info(
                        "study %d/%d %s: test Dice %.4f (validation %.4f at epoch %d), %d trainable, %.1f s",
                        i, len(cells), cell.name, done["test_dice"], done["val_dice"], done["best_epoch"],
                        done["trainable_parameters"], done["seconds"],
                    )  # fmt: skip
                results.append(done)
            rows = summarize(results)
            csv_path = write_csv(rows, self.study_dir / "study.csv")
            plots = write_plots(rows, self.study_dir / "plots")
            logger.info("study: %d cells, %s, plots in %s", len(cells), csv_path, plots[0].parent)
            if self.tracking is not None and self.tracking.run_id:
                self._log_parent(rows, csv_path, plots)
        except BaseException as err:
            self._end_parent(err)
            raise
        finally:
            if previous_sigterm is not None:
                signal.signal(signal.SIGTERM, previous_sigterm)
        self._end_parent(None)
        return csv_path

    # The study folder.

    def _read_record(self) -> dict[str, Any]:
        """``study.json``: the knobs the finished cells were trained with, and the parent run. Cells
        trained with other knobs are not this study's to add to: refused before any work."""
        path = self.study_dir / "study.json"
        knobs = _comparable({k: v for k, v in self.knobs.items() if k not in _FREE_KNOBS})
        record = json.loads(path.read_text()) if path.is_file() else {"knobs": knobs}
        changed = sorted(k for k in set(knobs) | set(record["knobs"]) if knobs.get(k) != record["knobs"].get(k))
        if changed:
            was = ", ".join(f"--{k} {record['knobs'].get(k)!r} (now {knobs.get(k)!r})" for k in changed)
            raise OptionError(
                f"study_dir={self.study_dir} holds cells trained with other knobs: {was}. Give this study "
                "another study_dir, or set the knobs back to go on with that study."
            )
        return record

    def _folder(self, cell: Cell) -> Path:
        return self.study_dir / "cells" / cell.name

    def _finished(self, cell: Cell) -> dict[str, Any] | None:
        path = self._folder(cell) / "result.json"
        return json.loads(path.read_text()) if path.is_file() else None

    # MLflow: the study's parent run, continued by a rerun.

    def _start_parent(self, record: dict[str, Any]) -> str | None:
        if self.tracking is None or not self.tracking.enabled:
            return None
        self.tracking.params.setdefault("n_cells", len(self.cells()))
        self.tracking.params.setdefault("n_training_cases", len(self.training))
        self.tracking.start(continue_run=record.get("mlflow_run_id"))
        if self.tracking.run_id != record.get("mlflow_run_id"):
            record["mlflow_run_id"] = self.tracking.run_id
            _write_json(self.study_dir / "study.json", record)
        return self.tracking.run_id

    def _log_parent(self, rows: Sequence[Mapping[str, Any]], csv_path: Path, plots: Sequence[Path]) -> None:
        for row in rows:  # test_dice_md8_ie0 (or test_dice_md8_decoder), its step the shots
            tokens = "decoder" if row["setting"] == "decoder" else f"ie{row['n_ie_prompts']}"
            name = f"test_dice_md{row['n_md_prompts']}_{tokens}"
            self.tracking.log_metric(name, row["test_dice_mean"], step=int(row["shots"]))
        self.tracking.log_artifact(csv_path)
        self.tracking.log_artifact(self.study_dir / "study.json")
        for plot in plots:
            self.tracking.log_artifact(plot, "plots")

    def _end_parent(self, err: BaseException | None) -> None:
        if self.tracking is None or not self.tracking.run_id:
            return
        if err is None:
            self.tracking.finish()
            return
        killed = isinstance(err, (KeyboardInterrupt, SystemExit))
        reason = "SIGTERM" if isinstance(err, Terminated) else f"{type(err).__name__}: {err}"
        self.tracking.set_tag("error", reason[:5000])
        self.tracking.finish("KILLED" if killed else "FAILED")

    # One cell.

    def _cell_parser(self, cell: Cell, parent: str | None) -> Any:
        from monai.bundle import ConfigParser

        folder = self._folder(cell)
        parser = ConfigParser()
        parser.read_config(self.cell_config)
        parser.update(self.knobs)
        overrides: dict[str, Any] = {
            "seed": cell.seed,
            "n_md_prompts": cell.n_md_prompts,
            "n_ie_prompts": cell.n_ie_prompts,
            "tune": cell.tune,
            "ckpt_dir": str(folder),
            "train#datalist": self.shot_cases(cell.shots, cell.seed),
            "tracking_enabled": parent is not None,
            "run_name": cell.name,
            "log_model": False,  # each cell's model.pt is an artifact; a pyfunc model per cell would be heavy
            "registered_model_name": None,
            "system_metrics_interval": 0,  # the parent samples the machine
            "tracking_run#kind": "study-cell",
            "tracking_run#tags": {"mlflow.parentRunId": parent or "", "study_cell": cell.name},
            "tracking_run#params#shots": cell.shots,
        }
        if self._backbone is not None:
            overrides["network_def#backbone"] = self._backbone
        if cell.tune == "decoder":
            # Its resume state would hold the prompts but not the decoder: an interrupted baseline starts over.
            overrides.update({"model_path": str(folder / DECODER_FILE), "resume": False})
            handlers = parser.get("train#handlers")
            index = next(i for i, h in enumerate(handlers) if str(h.get("_target_", "")).endswith("BestPromptSaver"))
            overrides[f"train#handlers#{index}"] = parser.get("decoder_saver")
        parser.update(overrides)
        return parser

    def _run_cell(self, cell: Cell, parent: str | None) -> dict[str, Any]:
        from monai.utils import set_determinism

        start = time.time()
        set_determinism(seed=cell.seed)  # before the network: its tokens are drawn from the seed
        self._restore_backbone()
        parser = self._cell_parser(cell, parent)
        device = torch.device(parser.get_parsed_content("device"))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        trainer = parser.get_parsed_content("train#trainer")
        network = parser.get_parsed_content("network")
        if self._backbone is None:
            self._backbone = unwrap(network).backbone
            decoder = self._backbone.mask_decoder.state_dict()
            self._decoder_as_loaded = {k: v.detach().clone() for k, v in decoder.items()}
        trainable = sum(p.numel() for p in trainable_parameters(network))
        trainer.run()
        best_path = Path(parser.get_parsed_content("model_path"))
        if cell.tune == "decoder":
            load_decoder(network, best_path)
            val, epoch = trainer.state.best_decoder_metric, trainer.state.best_decoder_epoch
        else:
            load_prompts(unwrap(network), best_path)
            val, epoch = trainer.state.best_prompts_metric, trainer.state.best_prompts_epoch
        evaluator = parser.get_parsed_content("test#evaluator")
        evaluator.run()
        metrics = {k: float(v) for k, v in evaluator.state.metrics.items()}
        result = {
            "cell": cell.name,
            "setting": cell.setting,
            **asdict(cell),
            "test_dice": metrics.pop("test_mean_dice"),
            "test_class_dice": {k.removeprefix("val_dice_"): v for k, v in metrics.items()},
            "val_dice": float(val) if math.isfinite(val) else float("nan"),
            "best_epoch": int(epoch),
            "epochs_run": int(trainer.state.epoch),
            "trainable_parameters": int(trainable),
            "seconds": round(time.time() - start, 2),
            "peak_gpu_gib": _peak_gib(device),
            "train_cases": [Path(str(t["image"])).name for t in self.shot_cases(cell.shots, cell.seed)],
            "n_test_images": len(parser.get_parsed_content("test#datalist")),
            "best_file": best_path.name,
        }
        run = parser.get_parsed_content("tracking_run")
        if run.run_id:
            result["mlflow_run_id"] = run.run_id
            run.log_metric("test_mean_dice", result["test_dice"], 0)
            run.log_metric("trainable_parameters", trainable, 0)
            run.log_metric("cell_seconds", result["seconds"], 0)
            if result["peak_gpu_gib"] is not None:
                run.log_metric("peak_gpu_gib", result["peak_gpu_gib"], 0)
        _write_json(self._folder(cell) / "result.json", result)  # last: what marks the cell done
        Path(parser.get_parsed_content("state_path")).unlink(missing_ok=True)  # a done cell never resumes
        return result

    def _restore_backbone(self) -> None:
        """SAM as loaded, frozen: what every cell starts from, whatever the cell before it trained."""
        if self._backbone is not None:
            self._backbone.mask_decoder.load_state_dict(self._decoder_as_loaded)
            self._backbone.requires_grad_(False)


def _peak_gib(device: torch.device) -> float | None:
    """Peak GPU memory of the cell (the shared backbone's weights included); None off CUDA."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)


def _raise_on_sigterm() -> Any:
    """SIGTERM between cells ends the study as Ctrl-C does (the parent run closed as KILLED)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise Terminated()

    return signal.signal(signal.SIGTERM, handler)


def _comparable(knobs: Mapping[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(dict(knobs), sort_keys=True, default=str))


def _write_json(path: Path, value: Mapping[str, Any]) -> Path:
    text = json.dumps(value, indent=2, sort_keys=True, default=str)
    return atomic_write(path, lambda tmp: tmp.write_text(text + "\n"))
