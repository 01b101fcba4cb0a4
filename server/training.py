"""The server training as a hospital would, from the round's global model: what the guard's
reference trainings and FLTrust's server update need. Pure PyTorch via ``client.task``."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord

from client.task import load_numpy_state, model_for, state_to_numpy, train_as_instructed
from common.data import Split
from common.protocol import TrainInstructions
from server.arrays import flatten


@dataclass(frozen=True)
class ServerTrainer:
    """Trains copies of the global model with the federation's recipe (``instructions``)."""

    instructions: TrainInstructions
    input_shape: tuple[int, ...]

    def update(self, sent: ArrayRecord, split: Split, *, seed: int, server_round: int) -> np.ndarray:
        """The flat update (trained minus sent) of one local round on ``split``."""
        names = list(sent)
        model = model_for(self.instructions.objective, input_shape=self.input_shape)
        load_numpy_state(model, {name: sent[name].numpy() for name in names})
        recipe = self.instructions.model_copy(update={"server_round": server_round})
        train_as_instructed(model, split, recipe, seed=seed)
        trained = state_to_numpy(model)
        return np.concatenate([np.asarray(trained[name], dtype=np.float64).ravel() for name in names]) - flatten(sent, names)
