"""MLflow tracking: every training and evaluation invocation is its own MLflow run.

By default runs go to a local SQLite store, ``<output_dir>/mlruns.db``, with artifacts in
``<output_dir>/mlartifacts``; ``tracking_uri`` (or ``MLFLOW_TRACKING_URI``) points at a
server instead, which is checked before any long work starts. ``tracking: false`` turns it
off. Only rank 0 of a distributed run talks to MLflow.

``TrainTracking`` (a trainer handler) logs the parameters, ``train_loss`` and ``lr`` (the rate
that step used) of every iteration and the metrics of every validation, each epoch's once its
training state is saved (a resumed training redoes an interrupted epoch: its values would
otherwise be in the run twice, those of the lost epoch beside the kept), and at the end
the parameters as resolved by MONAI's parser (``config/resolved_config.json``), the command
line and ``model.pt``. ``EvalTracking`` (an evaluator handler) logs the evaluation metrics,
``metrics.csv`` and the overlays. When MONAI's own ``--tracking mlflow`` adds its
``MLFlowHandler`` as well, ``one_tracker`` drops it, so nothing is logged twice.

A training's run ends FINISHED, FAILED (an exception) or KILLED (SIGTERM, Ctrl-C), with the
error as the ``error`` tag; its id is kept in the training state, so a resumed training goes on
with the same run. The git commit is a tag; MLflow's system metrics monitor samples the machine.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ignite.engine import Engine, Events

from ..common.flags import flag
from .distributed import rank
from .handlers import iteration_loss, learning_rate, numeric_metrics, on_validation, remembered

logger = logging.getLogger(__name__)

BUNDLE = Path(__file__).resolve().parents[2]
ENV_URI = "MLFLOW_TRACKING_URI"


class TrackingError(RuntimeError):
    """The tracking store cannot be reached or written, or holds what this run must not add to."""


def bundle_version() -> str:
    try:
        return json.loads((BUNDLE / "configs" / "metadata.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        return "unknown"


def resolve_uri(tracking_uri: str | None, output_dir: str | Path) -> str:
    """``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the SQLite store in ``output_dir``."""
    from monai.utils import path_to_sqlite_uri

    uri = tracking_uri or os.environ.get(ENV_URI)
    if uri:
        return str(uri)
    return path_to_sqlite_uri(Path(output_dir).resolve() / "mlruns.db")


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail within ``timeout`` seconds, with a clear message, if an HTTP tracking server is down."""
    if urlparse(uri).scheme not in ("http", "https"):
        return
    import requests

    try:
        response = requests.get(uri.rstrip("/") + "/health", timeout=timeout)
    except requests.RequestException as err:
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({type(err).__name__}); start it, point "
            "`tracking_uri` elsewhere, or switch tracking off with `--tracking_enabled false`"
        ) from err
    if response.status_code >= 400:
        raise TrackingError(f"MLflow tracking server {uri} answered {response.status_code} to /health")


REGISTRY_FINGERPRINT_TAG = "ptsam.backbone_fingerprint"  # on a registered model: its versions' SAM backbone


class TrackingRun:
    """One MLflow run, created when first needed and shared by the handlers of one invocation."""

    def __init__(
        self,
        enabled: bool = True,
        tracking_uri: str | None = None,
        output_dir: str | Path = ".",
        experiment_name: str = "ptsam",
        run_name: str | None = None,
        kind: str = "train",
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        check_timeout: float = 5.0,
        system_metrics_interval: float = 0.0,
    ):
        self.enabled = flag(enabled) and rank() == 0
        self.output_dir = Path(output_dir)
        self.uri = resolve_uri(tracking_uri, output_dir)
        self.experiment_name, self.kind = experiment_name, kind
        self.run_name = run_name or f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.params = dict(params or {})
        self.tags = {k: str(v) for k, v in (tags or {}).items()}
        self.run_id: str | None = None
        self.client: Any = None
        self.system_metrics_interval = float(system_metrics_interval or 0)
        self._monitor: Any = None
        if self.enabled:
            check_reachable(self.uri, check_timeout)

    def start(self, continue_run: str | None = None) -> None:
        """Create a new run (never reuse an earlier one, whatever its name), or go on with
        ``continue_run``, the run of the interrupted training this one resumes."""
        if not self.enabled or self.run_id is not None:
            return
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        if continue_run and self._continue(continue_run):
            self._monitor_system(resume=True)
            return
        experiment = self.client.get_experiment_by_name(self.experiment_name)
        if experiment is None:
            local = urlparse(self.uri).scheme not in ("http", "https")
            location = (self.output_dir.resolve() / "mlartifacts").as_uri() if local else None
            experiment_id = self.client.create_experiment(self.experiment_name, artifact_location=location)
        else:
            experiment_id = experiment.experiment_id
        tags = {"bundle_version": bundle_version(), "kind": self.kind, "command": " ".join(sys.argv), **self.tags}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        run = self.client.create_run(experiment_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        for key, value in self.params.items():
            self.client.log_param(self.run_id, key, value)
        logger.info("MLflow run %s (%s) in %s", self.run_name, self.run_id, self.uri)
        self._monitor_system(resume=False)

    def _monitor_system(self, resume: bool) -> None:
        """CPU, memory, disk and network (and GPUs, with nvidia-ml-py) as ``system/*`` metrics,
        every ``system_metrics_interval`` seconds (MLflow's monitor, a background thread)."""
        if self.system_metrics_interval <= 0:
            return
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(
            self.run_id, sampling_interval=self.system_metrics_interval, resume_logging=resume, tracking_uri=self.uri
        )
        self._monitor.start()

    def _continue(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            logger.warning("MLflow run %s of the interrupted training is not in %s: a new run", run_id, self.uri)
            return False
        if run.info.lifecycle_stage != "active":
            return False
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        self.client.set_tag(run_id, "resumed", str(int(run.data.tags.get("resumed", "0")) + 1))
        for key, value in self.params.items():
            self.log_param(key, value, known=run.data.params)
        logger.info("MLflow run %s (%s) continued in %s", run.info.run_name, run_id, self.uri)
        return True

    def log_param(self, key: str, value: Any, known: Mapping[str, str] | None = None) -> None:
        """Log a parameter; one a continued run has already is kept (MLflow's values are final)."""
        if not self.run_id:
            return
        if known is not None and key in known:
            if known[key] != str(value):
                logger.warning("MLflow run %s keeps %s=%s (this invocation: %s)", self.run_id, key, known[key], value)
            return
        self.client.log_param(self.run_id, key, value)

    def set_tag(self, key: str, value: str) -> None:
        if self.run_id:
            self.client.set_tag(self.run_id, key, value)

    def log_metric(self, key: str, value: float, step: int) -> None:
        if self.run_id:
            self.client.log_metric(self.run_id, key, float(value), step=step)

    def log_metrics(self, metrics: Sequence[Any]) -> None:
        """MLflow ``Metric`` entries, in batches (each keeps the time it was measured)."""
        for start in range(0, len(metrics) if self.run_id else 0, 1000):
            self.client.log_batch(self.run_id, metrics=list(metrics[start : start + 1000]))

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if not self.run_id or not path.exists():
            return
        if path.is_dir():  # kept as a folder of its own name
            self.client.log_artifacts(self.run_id, str(path), artifact_path or path.name)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        if self.run_id:
            self.client.log_text(self.run_id, text, name)

    def check_registered_name(self, name: str | None) -> None:
        """Before any work: ``name`` in the store's model registry is new, or holds PTSAM prompts
        for this run's SAM backbone. Versions of one registered model must all load with the same
        SAM checkpoint; another team's model of that name is not ours to add versions to."""
        if not (self.enabled and name):
            return
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        try:
            tags = MlflowClient(tracking_uri=self.uri).get_registered_model(name).tags
        except MlflowException as err:
            if err.error_code == "RESOURCE_DOES_NOT_EXIST":
                return
            raise
        mine = str(self.params.get("backbone_fingerprint", ""))
        theirs = tags.get(REGISTRY_FINGERPRINT_TAG)
        if theirs is None:
            raise TrackingError(
                f"registered_model_name={name}: a registered model of that name in {self.uri} is not a PTSAM "
                "model; choose another name"
            )
        if theirs != mine:
            raise TrackingError(
                f"registered_model_name={name}: its versions hold prompts for another SAM backbone (fingerprint "
                f"{theirs}, this run {mine}), which load with another checkpoint; choose another name"
            )

    def log_model(self, model_path: str | Path, registered_model_name: str | None = None) -> None:
        """The prompts as an MLflow pyfunc model in this run (``scripts.mlflow_model``), registered
        in the same store's model registry as ``registered_model_name`` when given (tagged with
        the backbone's fingerprint, which ``check_registered_name`` compares)."""
        if not self.run_id:
            return
        import mlflow

        from ..mlflow_model import log_model

        with fluent_uri(self.uri), mlflow.start_run(run_id=self.run_id):
            info = log_model(model_path, registered_model_name)
        if registered_model_name:
            fingerprint = str(self.params.get("backbone_fingerprint", ""))
            self.client.set_registered_model_tag(registered_model_name, REGISTRY_FINGERPRINT_TAG, fingerprint)
        registered = f", registered as {registered_model_name}" if registered_model_name else ""
        logger.info("MLflow model %s%s", info.model_uri, registered)

    def finish(self, status: str = "FINISHED") -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        if self.run_id:
            self.client.set_terminated(self.run_id, status)


@contextmanager
def fluent_uri(uri: str) -> Iterator[None]:
    """MLflow's global tracking URI set to ``uri`` for the block, then put back as it was.
    ``set_tracking_uri`` also writes ``MLFLOW_TRACKING_URI``, which ``resolve_uri`` reads: left
    behind, it would send every later run of the process (MONAI Label trains again and again in
    one) to that store instead of its own ``output_dir``."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    env, previous = os.environ.get(ENV_URI), utils._tracking_uri  # None: not set (get_ would resolve it)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)
        if env is None:
            os.environ.pop(ENV_URI, None)
        else:
            os.environ[ENV_URI] = env


class Terminated(SystemExit):
    """SIGTERM during training, raised in the main thread so the run can be closed as KILLED."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated()


def git_commit() -> str | None:
    """The commit of the bundle's repository, when it is one and git is there."""
    try:
        done = subprocess.run(
            ["git", "-C", str(BUNDLE), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and len(commit) == 40 else None


class TrainTracking:
    """Attached to the trainer; validation metrics are logged when the evaluator completes."""

    def __init__(
        self,
        run: TrackingRun,
        evaluator: Engine | None = None,
        optimizer: Any = None,
        artifacts: Sequence[str | Path] = (),
        n_training_images: int | None = None,
        model_path: str | Path | None = None,
        registered_model_name: str | None = None,
    ):
        self.run, self.evaluator, self.optimizer = run, evaluator, optimizer
        self.artifacts = list(artifacts)
        self.model_path, self.registered_model_name = model_path, registered_model_name or None
        if n_training_images is not None:
            run.params.setdefault("n_training_images", n_training_images)

    def attach(self, trainer: Engine) -> None:
        # The run's id is kept in the training state: a resumed training continues its run.
        remembered(trainer, mlflow_run_id="")
        # Started with the first epoch, after the training state (if any) has been loaded.
        trainer.add_event_handler(Events.EPOCH_STARTED, self._start)
        # The rate a step uses, read before it: the scheduler moves it on when the step completes.
        trainer.add_event_handler(Events.ITERATION_STARTED, self._rate)
        trainer.add_event_handler(Events.ITERATION_COMPLETED, self._iteration)
        if self.evaluator is not None:
            on_validation(trainer, self.evaluator, self._validated)
        trainer.add_event_handler(Events.COMPLETED, self._complete)
        trainer.add_event_handler(Events.EXCEPTION_RAISED, self._failed)
        self._previous_sigterm: Any = None
        self._lr: float | None = None
        self._pending: list[Any] = []  # this epoch's metrics, logged once its state is saved
        self._flushing = False

    def _start(self, trainer: Engine) -> None:
        if not self._flushing:  # attached now, after every handler, the training state's save included
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self._flush)
            self._flushing = True
        if self.run.run_id is not None:
            return
        self.run.start(continue_run=trainer.state.mlflow_run_id or None)
        trainer.state.mlflow_run_id = self.run.run_id or ""
        if self.run.run_id and threading.current_thread() is threading.main_thread():
            self._previous_sigterm = signal.signal(signal.SIGTERM, _raise_terminated)

    def _restore_sigterm(self) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None

    def _failed(self, trainer: Engine, error: BaseException) -> None:
        """Close the run as KILLED (SIGTERM, Ctrl-C) or FAILED, with the error as a tag; then
        let the error go on (Ignite hands it to this handler instead of raising it)."""
        self._restore_sigterm()
        saved = getattr(trainer.state, "saved_epoch", None)  # set by the training state, if any
        if saved is None or saved >= trainer.state.epoch:  # this epoch is kept: never redone
            self._flush()
        elif self.run.run_id and self._pending:  # an epoch that a resumed training redoes: kept aside
            unsaved = [{"key": m.key, "value": m.value, "step": m.step} for m in self._pending]
            self.run.log_text(json.dumps(unsaved, indent=1), "interrupted_epoch_metrics.json")
        self._pending = []
        if self.run.run_id:
            killed = isinstance(error, (KeyboardInterrupt, SystemExit))
            reason = "SIGTERM" if isinstance(error, Terminated) else f"{type(error).__name__}: {error}"
            self.run.set_tag("error", reason[:5000])
            self.run.finish("KILLED" if killed else "FAILED")
        raise error

    def _rate(self, trainer: Engine) -> None:
        self._lr = learning_rate(self.optimizer) if self.optimizer is not None else None

    def _iteration(self, trainer: Engine) -> None:
        step = trainer.state.iteration
        loss = iteration_loss(trainer)
        if loss is not None:
            self._measured("train_loss", loss, step)
        if self._lr is not None:
            self._measured("lr", self._lr, step)

    def _validated(self, trainer: Engine, metrics: Mapping[str, Any]) -> None:
        for key, value in numeric_metrics(metrics).items():
            self._measured(key, value, trainer.state.epoch)

    def _measured(self, key: str, value: float, step: int) -> None:
        from mlflow.entities import Metric

        if self.run.run_id:
            self._pending.append(Metric(key, float(value), int(time.time() * 1000), step))

    def _flush(self, trainer: Engine | None = None) -> None:
        # Cleared once logged: a SIGTERM that lands while they are sent (it is raised right here,
        # just after the epoch's state was saved) leaves them for ``_failed`` to send again.
        if self._pending:
            self.run.log_metrics(self._pending)
            self._pending = []

    def _complete(self, trainer: Engine) -> None:
        self._flush()
        self.run.log_text(json.dumps(self.run.params, indent=2, default=str), "config/resolved_config.json")
        self.run.log_text(" ".join(sys.argv), "config/command.txt")
        for path in self.artifacts:
            self.run.log_artifact(path)
        if self.model_path is not None and Path(self.model_path).is_file():
            self.run.log_model(self.model_path, self.registered_model_name)
        self._restore_sigterm()
        self.run.finish()


class EvalTracking:
    """Attached to an evaluator: its metrics, ``metrics.csv`` and overlays, one run per evaluation."""

    def __init__(self, run: TrackingRun, artifacts: Sequence[str | Path] = ()):
        self.run, self.artifacts = run, list(artifacts)

    def attach(self, evaluator: Engine) -> None:
        evaluator.add_event_handler(Events.STARTED, lambda e: self.run.start())
        evaluator.add_event_handler(Events.COMPLETED, self._complete)

    def _complete(self, evaluator: Engine) -> None:
        for key, value in numeric_metrics(evaluator.state.metrics).items():
            self.run.log_metric(key, value, 0)
        self.run.log_text(" ".join(sys.argv), "config/command.txt")
        for path in self.artifacts:
            self.run.log_artifact(path)
        self.run.finish()


def one_tracker(handlers: Sequence[Any], own_tracking: bool) -> list[Any]:
    """Drop MONAI's ``MLFlowHandler`` (added by ``--tracking mlflow``) while this bundle's own
    tracking is on, so a run is never logged twice; with it off, MONAI's tracking works alone."""
    from monai.handlers import MLFlowHandler

    if not flag(own_tracking):
        return list(handlers)
    kept = [h for h in handlers if not isinstance(h, MLFlowHandler)]
    if len(kept) < len(handlers):
        logger.info("--tracking mlflow: the bundle's own MLflow tracking records this run already")
    return kept
