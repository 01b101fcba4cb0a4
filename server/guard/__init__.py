"""The server guard: which training updates to exclude, and how far any accepted one may
move the model. See ``docs/guard.md`` for what each detector asks and why."""

from server.guard.config import GuardConfig
from server.guard.guard import Guard, RoundJudgement, Verdict

__all__ = ["Guard", "GuardConfig", "RoundJudgement", "Verdict"]
