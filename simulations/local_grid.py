"""An in-process Flower Grid: the ServerApp's messages go straight to ClientApp objects.

The same ServerApp and ClientApp code runs as under Flower's Ray simulation, minus Ray's
start-up and process hops: used by tests and by benchmarks that run many federations.
A ClientApp that raises yields an error reply, as a real SuperNode's would.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

CLIENT_APP_ERROR = 2  # flwr's ErrorCode.CLIENT_APP_RAISED_EXCEPTION
# Whether hospital ``partition`` answers a message of this type in this round (simulated
# late joiners and dropouts); None: always.
Availability = Callable[[int, str, int], bool]


class LocalGrid(Grid):
    def __init__(
        self, client_app: ClientApp, *, num_nodes: int, run_id: int = 1, availability: Availability | None = None
    ) -> None:
        self._client_app = client_app
        self._availability = availability
        self._run = Run.create_empty(run_id)
        # Messages stamp their sender from this process-wide identity; Flower's own
        # simulation sets it the same way before starting a ServerApp.
        TaskIdentity.task_id, TaskIdentity.run_id = 1, run_id
        TaskIdentity.node_id = SUPERLINK_NODE_ID
        # Node ids as Flower would hand them out: arbitrary, not the partition index.
        self._contexts = {
            1000 + 17 * pid: Context(
                run_id=run_id,
                node_id=1000 + 17 * pid,
                node_config={"partition-id": pid, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for pid in range(num_nodes)
        }
        self._replies: dict[str, Message] = {}
        self._counter = itertools.count()

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def _deliver(self, message: Message) -> Message:
        context = self._contexts[message.metadata.dst_node_id]
        if self._availability is not None:
            from simulations.attacks import round_of

            partition = int(context.node_config["partition-id"])
            if not self._availability(partition, message.metadata.message_type, round_of(message)):
                return Message(Error(code=CLIENT_APP_ERROR, reason="hospital unavailable this round"), reply_to=message)
        try:
            return self._client_app(message, context)
        except Exception as error:  # noqa: BLE001 - a failing client must not stop the server
            reason = f"{type(error).__name__}: {error}"
            return Message(Error(code=CLIENT_APP_ERROR, reason=reason), reply_to=message)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            if message.metadata.dst_node_id not in self._contexts:
                raise ValueError(f"unknown node {message.metadata.dst_node_id}")
            message_id = f"{next(self._counter)}-{uuid4().hex[:8]}"
            message.metadata.__dict__["_message_id"] = message_id
            self._replies[message_id] = self._deliver(message)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))
