"""The hospital's Flower ClientApp: message handling only; the learning is in ``client.task``."""

from __future__ import annotations

import zlib

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.objectives import build_objective
from client.sites import SiteSource, site_from_node_config
from client.task import evaluate, load_numpy_state, new_model, train_locally
from common.data import SiteData
from common.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    EVAL_SPLITS,
    METRICS_KEY,
    PROFILE_KEY,
    ProtocolError,
    SiteProfile,
    TrainInstructions,
    eval_metric_key,
)


def _global_model(message: Message):
    if ARRAYS_KEY not in message.content.array_records:
        raise ProtocolError(f"message carries no '{ARRAYS_KEY}' ArrayRecord")
    model = new_model(seed=0)
    record = message.content.array_records[ARRAYS_KEY]
    load_numpy_state(model, {key: array.numpy() for key, array in record.items()})
    return model


def _round_seed(instructions: TrainInstructions, site: SiteData) -> int:
    # Different shuffles per site and round, yet reproducible for a given scenario seed.
    return zlib.crc32(f"{instructions.seed}/{site.name}/{instructions.server_round}".encode())


def handle_query(site: SiteData) -> RecordDict:
    profile = SiteProfile(site=site.name, role=site.role, **{"num-train": len(site.train)})
    return RecordDict({PROFILE_KEY: profile.to_record()})


def handle_train(message: Message, site: SiteData) -> RecordDict:
    instructions = TrainInstructions.from_record(message.content.config_records.get(CONFIG_KEY))
    objective = build_objective(
        instructions.objective, instructions.params(), server_round=instructions.server_round
    )
    model = _global_model(message)
    stats = train_locally(
        model,
        site.train,
        objective,
        epochs=instructions.local_epochs,
        batch_size=instructions.batch_size,
        learning_rate=instructions.learning_rate,
        weight_decay=instructions.weight_decay,
        seed=_round_seed(instructions, site),
    )
    metrics = MetricRecord({f"train-{k}": float(v) for k, v in stats.items()})
    metrics["num-examples"] = len(site.train)
    return RecordDict({ARRAYS_KEY: ArrayRecord(model.state_dict()), METRICS_KEY: metrics})


def handle_evaluate(message: Message, site: SiteData) -> RecordDict:
    instructions = TrainInstructions.from_record(message.content.config_records.get(CONFIG_KEY))
    objective = build_objective(
        instructions.objective, instructions.params(), server_round=instructions.server_round
    )
    model = _global_model(message)
    metrics = MetricRecord({"num-examples": len(site.test)})
    for split in EVAL_SPLITS:
        for name, value in evaluate(model, site.split(split), objective).items():
            metrics[eval_metric_key(split, name)] = value
    return RecordDict({METRICS_KEY: metrics})


def build_client_app(
    site_source: SiteSource = site_from_node_config, *, torch_threads: int | None = None
) -> ClientApp:
    """A ClientApp whose hospital data comes from ``site_source(context)``.

    ``torch_threads=1`` suits simulations where several virtual clients share the cores.
    """
    app = ClientApp()

    def site(context: Context) -> SiteData:
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)
        return site_source(context)

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return Message(handle_query(site(context)), reply_to=message)

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return Message(handle_train(message, site(context)), reply_to=message)

    @app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        return Message(handle_evaluate(message, site(context)), reply_to=message)

    return app


# Deployed SuperNodes load this object (pyproject: [tool.flwr.app.components]).
app = build_client_app()
