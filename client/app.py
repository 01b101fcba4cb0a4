"""The hospital's Flower ClientApp: message handling only; the learning is in ``client.task``."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.objectives import build_objective
from client.priors import prior_shift_offset
from client.privacy import (
    DPSettings,
    PrivacyBudgetSpent,
    PrivacyLedger,
    batches_per_epoch,
    calibrated_noise_multiplier,
    train_privately,
)
from client.sites import BudgetSource, SiteSource, budget_from_node_config, site_from_node_config
from client.task import (
    evaluate,
    feature_moments,
    load_numpy_state,
    new_model,
    predict_logits,
    split_strata,
    train_locally,
)
from common.calibration import (
    CALIBRATIONS,
    Decisions,
    hospital_posteriors,
    log_loss_per_calibration,
    logit,
    estimated_prevalence,
    sensitivity_at_specificity,
)
from common.data import SiteData
from common.protocol import (
    ARRAYS_KEY,
    BUDGET_SPENT_METRIC,
    REASON_KEY,
    STATISTICS_KEY,
    CHECKPOINT_KEY,
    CONFIG_KEY,
    EVAL_SPLITS,
    FEATURE_MOMENTS_KEY,
    METRICS_KEY,
    PROFILE_KEY,
    ProtocolError,
    SiteProfile,
    TrainInstructions,
    eval_metric_key,
    federation_statistics,
)
from common.provenance.log import CHECKPOINT_FILE, durable_append
from common.files import atomic_write_text
from common.provenance.records import Checkpoint, load_public_key

PROVENANCE_STATE = "provenance"
PRIVACY_STATE = "privacy"
LOCAL_STATE = "local-model-state"
log = logging.getLogger("causalfed.client")


def _global_model(message: Message, site: SiteData, objective, context: Context):
    """The received global model, with the entries this hospital keeps for itself (FedBN) restored."""
    if ARRAYS_KEY not in message.content.array_records:
        raise ProtocolError(f"message carries no '{ARRAYS_KEY}' ArrayRecord")
    model = new_model(seed=0, input_shape=site.train.input_shape, architecture=objective.architecture)
    state = {key: array.numpy() for key, array in message.content.array_records[ARRAYS_KEY].items()}
    kept = context.state.array_records.get(LOCAL_STATE)
    if kept is not None:
        state |= {key: array.numpy() for key, array in kept.items() if key in state}
    load_numpy_state(model, state)
    objective.localise(model, torch.as_tensor(site.train.images, dtype=torch.float32))
    return model


def _keep_local_state(model, objective, context: Context) -> None:
    keys = objective.local_state_keys(model)
    if keys:
        context.state[LOCAL_STATE] = ArrayRecord({k: v for k, v in model.state_dict().items() if k in keys})


def _round_setup(message: Message, site: SiteData, context: Context):
    """This round's recipe, its objective (with the federation's statistics) and the global model."""
    config = message.content.config_records.get(CONFIG_KEY)
    instructions = TrainInstructions.from_record(config)
    objective = build_objective(
        instructions.objective,
        instructions.params(),
        server_round=instructions.server_round,
        num_rounds=instructions.num_rounds,
        federation=federation_statistics(config),
    )
    return instructions, objective, _global_model(message, site, objective, context)


def _round_seed(instructions: TrainInstructions, site: SiteData) -> int:
    # Different shuffles per site and round, yet reproducible for a given scenario seed.
    return zlib.crc32(f"{instructions.seed}/{site.name}/{instructions.server_round}".encode())


def handle_query(site: SiteData) -> RecordDict:
    counts = {"num-train": len(site.train), "num-positive": int(site.train.labels.sum())}
    profile = SiteProfile(site=site.name, role=site.role, **counts, **{"input-shape": list(site.train.input_shape)})
    return RecordDict({PROFILE_KEY: profile.to_record()})


def _dp_settings(instructions: TrainInstructions, site: SiteData, budget: float | None) -> DPSettings:
    # Calibrated so the planned rounds spend exactly the federation's target epsilon.
    per_epoch = batches_per_epoch(num_examples=len(site.train), batch_size=instructions.batch_size)
    noise = calibrated_noise_multiplier(
        target_epsilon=instructions.dp_target_epsilon,
        delta=instructions.dp_delta,
        sample_rate=1.0 / per_epoch,
        total_steps=instructions.num_rounds * instructions.local_epochs * per_epoch,
    )
    return DPSettings(
        noise_multiplier=noise,
        max_grad_norm=instructions.dp_max_grad_norm,
        delta=instructions.dp_delta,
        budget=budget if budget is not None else instructions.dp_target_epsilon,
    )


LEDGER_FILE = "privacy-ledger.json"


def _load_ledger(context: Context, ledger_path: Path | None) -> PrivacyLedger:
    """The longer of the ledgers in node state and on the hospital's disk.

    The disk copy survives a restart of the federation (a resumed run is a new Flower run
    with empty node state): without it a hospital would start counting from zero again.
    """
    saved = context.state.config_records.get(PRIVACY_STATE)
    ledgers = [PrivacyLedger.from_json(str(saved["ledger"])) if saved is not None else PrivacyLedger()]
    if ledger_path is not None and ledger_path.is_file():
        ledgers.append(PrivacyLedger.from_json(ledger_path.read_text()))
    return max(ledgers, key=lambda ledger: len(ledger.entries))


def _train_with_privacy(
    model, site, objective, instructions, context, budget, ledger_path: Path | None, **options
) -> dict[str, float]:
    """DP-SGD with a ledger that accumulates epsilon over every round this hospital trained."""
    ledger = _load_ledger(context, ledger_path)
    stats = train_privately(model, site.train, objective, _dp_settings(instructions, site, budget), ledger, **options)
    context.state[PRIVACY_STATE] = ConfigRecord({"ledger": ledger.to_json(), "epsilon": stats["dp-epsilon"]})
    if ledger_path is not None:
        atomic_write_text(ledger_path, ledger.to_json())
    return stats


def handle_train(
    message: Message,
    site: SiteData,
    context: Context,
    *,
    epsilon_budget: float | None = None,
    state_dir: Path | None = None,
) -> RecordDict:
    instructions, objective, model = _round_setup(message, site, context)
    statistics = _statistics(objective, model, site)
    options = {
        "epochs": instructions.local_epochs,
        "batch_size": instructions.batch_size,
        "learning_rate": instructions.learning_rate,
        "weight_decay": instructions.weight_decay,
        "seed": _round_seed(instructions, site),
    }
    if instructions.dp_target_epsilon > 0:
        try:
            ledger_path = state_dir / site.name / LEDGER_FILE if state_dir else None
            stats = _train_with_privacy(
                model, site, objective, instructions, context, epsilon_budget, ledger_path, **options
            )
        except PrivacyBudgetSpent as spent:
            log.warning("%s: %s", site.name, spent)
            metrics = MetricRecord({BUDGET_SPENT_METRIC: 1, "num-examples": 0})
            return RecordDict({METRICS_KEY: metrics, CONFIG_KEY: ConfigRecord({REASON_KEY: str(spent)})})
    else:
        stats = train_locally(model, site.train, objective, **options)
    _keep_local_state(model, objective, context)
    metrics = MetricRecord({f"train-{k}": float(v) for k, v in stats.items()})
    metrics["num-examples"] = len(site.train)
    content = RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: metrics})
    if statistics:
        content[STATISTICS_KEY] = ConfigRecord({k: [float(x) for x in v] for k, v in statistics.items()})
    return content


def _statistics(objective, model, site: SiteData) -> dict:
    """The objective's contribution to next round's federation statistics, at the received model."""
    images = torch.as_tensor(site.train.images, dtype=torch.float32)
    labels = torch.as_tensor(site.train.labels).float()
    model.eval()
    try:
        values = objective.statistics(model, images, labels, split_strata(site.train))
        return {key: np.asarray(value).reshape(-1) for key, value in values.items()}
    finally:
        model.train()  # training follows (and Opacus insists on training mode)


def handle_evaluate(message: Message, site: SiteData, context: Context) -> RecordDict:
    instructions, objective, model = _round_setup(message, site, context)
    offset = 0.0
    if instructions.prior_adjustment:
        offset = prior_shift_offset(
            local_positive=int(site.train.labels.sum()),
            local_total=len(site.train),
            reference_prevalence=instructions.federation_prevalence,
        )
    metrics = MetricRecord({"num-examples": len(site.test)})
    for split in EVAL_SPLITS:
        for name, value in evaluate(model, site.split(split), objective, logit_offset=offset).items():
            metrics[eval_metric_key(split, name)] = value
    for key, value in calibrated_decisions(model, site, instructions.federation_prevalence).items():
        metrics[key] = value
    content = RecordDict({METRICS_KEY: metrics})
    if _reports_feature_moments(instructions, site):
        content[FEATURE_MOMENTS_KEY] = ConfigRecord(feature_moments(model, site.train.images).to_record())
    return content


def calibrated_decisions(model, site: SiteData, federation_prevalence: float) -> dict[str, float | list[float]]:
    """What the server needs to calibrate this round's model and read off this hospital's
    decisions: for every (scale, bias) of ``common.calibration.CALIBRATIONS``, the
    validation log-loss under this hospital's prevalence, and the test decisions (accuracy,
    balanced accuracy, ECE) at the prevalence it knows (its training labels) or, where it
    has none (a held-out hospital), estimates from its unlabeled images. The logits are the
    image's evidence (``predict_logits``), so every model is shifted to the hospital's
    prevalence the same way. Aggregates only."""
    test_logits = predict_logits(model, site.test.images)
    val_logits = predict_logits(model, site.val.images)
    labelled = site.role == "train" and len(site.train) > 0
    known = (int(site.train.labels.sum()) + 1) / (len(site.train) + 2)
    unlabeled = np.concatenate([val_logits, test_logits])
    grids: dict[str, list[float]] = {"prevalence-grid": [], "test-accuracy-grid": [],
                                     "test-balanced-accuracy-grid": [], "test-ece-grid": []}
    for calibration in CALIBRATIONS:
        at_federation = hospital_posteriors(unlabeled, calibration=calibration, prevalence=federation_prevalence,
                                            federation_prevalence=federation_prevalence)
        prevalence = known if labelled else estimated_prevalence(at_federation,
                                                                 federation_prevalence=federation_prevalence)[0]
        decisions = Decisions.of(hospital_posteriors(test_logits, calibration=calibration,
                                                     prevalence=prevalence,
                                                     federation_prevalence=federation_prevalence), site.test.labels)
        grids["prevalence-grid"].append(prevalence)
        grids["test-accuracy-grid"].append(decisions.accuracy)
        grids["test-balanced-accuracy-grid"].append(decisions.balanced_accuracy)
        grids["test-ece-grid"].append(decisions.ece)
    shift = logit(known) - logit(federation_prevalence) if labelled else 0.0
    return grids | {
        "val-nll-grid": log_loss_per_calibration(val_logits, site.val.labels, shift=shift).tolist(),
        "test-sens-at-90-spec": sensitivity_at_specificity(test_logits, site.test.labels),
        "prevalence-estimated": float(not labelled),
    }


def _reports_feature_moments(instructions: TrainInstructions, site: SiteData) -> bool:
    """Only at the last round, from training hospitals, and never under DP-SGD: the moments
    are released without noise, which would void the hospital's privacy guarantee."""
    last_round = instructions.server_round == instructions.num_rounds
    return last_round and site.role == "train" and instructions.dp_target_epsilon == 0 and len(site.train) > 0


def handle_checkpoint(
    message: Message, context: Context, site: SiteData, *, keep_in: Path | None, server_key: bytes | None
) -> RecordDict:
    """Keep the server's signed checkpoint: in the node state and, if configured, on disk.

    With a pinned server key the hospital refuses a checkpoint that key did not sign.
    """
    record = message.content.config_records.get(CHECKPOINT_KEY)
    if record is None or CHECKPOINT_KEY not in record:
        raise ProtocolError("checkpoint message without a checkpoint")
    checkpoint = Checkpoint.from_json(str(record[CHECKPOINT_KEY]))
    if server_key is not None and not checkpoint.verify(load_public_key(server_key)):
        raise ProtocolError(f"checkpoint {checkpoint.tree_size} is not signed by the pinned server key")
    previous = context.state.config_records.get(PROVENANCE_STATE)
    if previous is not None and int(previous["tree-size"]) > checkpoint.tree_size:
        raise ProtocolError(f"checkpoint goes back from {previous['tree-size']} to {checkpoint.tree_size} records")
    text = checkpoint.to_json()
    context.state[PROVENANCE_STATE] = ConfigRecord({"latest": text, "tree-size": checkpoint.tree_size})
    if keep_in is not None:
        folder = keep_in / site.name
        folder.mkdir(parents=True, exist_ok=True)
        durable_append(folder / CHECKPOINT_FILE, text.encode())
    return RecordDict({CHECKPOINT_KEY: ConfigRecord({"kept": checkpoint.tree_size})})


def message_round(message: Message) -> int | None:
    """The server round a train or evaluate message is for (None for other messages)."""
    config = message.content.config_records.get(CONFIG_KEY)
    return int(config["server-round"]) if config is not None and "server-round" in config else None


def _node_path(context: Context, key: str, fallback: Path | None) -> Path | None:
    value = context.node_config.get(key)
    return Path(str(value)) if value else fallback


def build_client_app(
    site_source: SiteSource = site_from_node_config,
    *,
    budget_source: BudgetSource = budget_from_node_config,
    torch_threads: int | None = None,
    checkpoint_dir: Path | None = None,
    server_key: bytes | None = None,
) -> ClientApp:
    """A ClientApp whose hospital data comes from ``site_source(context)``.

    ``torch_threads=1`` suits simulations where several virtual clients share the cores.
    ``checkpoint_dir`` (or node config ``checkpoint-dir``) is where the hospital keeps the
    server's signed log checkpoints and its privacy ledger; ``server_key`` (or ``server-key``, a PEM path) pins
    the key they must be signed with. ``budget_source(context)`` gives the hospital's own
    DP epsilon budget (node config ``epsilon-budget``), if it set one.
    """
    app = ClientApp()

    def site(context: Context, message: Message | None = None) -> SiteData:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        return site_source(context, message_round(message) if message is not None else None)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return Message(handle_query(site(context)), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        content = handle_train(
            message,
            site(context, message),
            context,
            epsilon_budget=budget_source(context),
            state_dir=_node_path(context, "checkpoint-dir", checkpoint_dir),
        )
        return Message(content, reply_to=message)

    @app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        return Message(handle_evaluate(message, site(context, message), context), reply_to=message)

    @app.query("checkpoint")
    def keep_checkpoint(message: Message, context: Context) -> Message:
        key_path = _node_path(context, "server-key", None)
        content = handle_checkpoint(
            message,
            context,
            site(context),
            keep_in=_node_path(context, "checkpoint-dir", checkpoint_dir),
            server_key=key_path.read_bytes() if key_path else server_key,
        )
        return Message(content, reply_to=message)

    return app


# Deployed SuperNodes load this object (pyproject: [tool.flwr.app.components]).
app = build_client_app()
