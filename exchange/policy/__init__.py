"""The decision point: Rego policies evaluated by Open Policy Agent.

``decide(engine, DecisionInput(...))`` and ``decide_batch`` work over either engine
(``EmbeddedEngine``, ``ServerEngine``) and never raise: a failure is a deny.
"""

from exchange.policy.decisions import (
    ACTIONS,
    Decision,
    DecisionInput,
    ResourceFacts,
    Subject,
    decide,
    decide_batch,
)
from exchange.policy.engine import EmbeddedEngine, PolicyEngine, PolicyError, ServerEngine

__all__ = [
    "ACTIONS",
    "Decision",
    "DecisionInput",
    "EmbeddedEngine",
    "PolicyEngine",
    "PolicyError",
    "ResourceFacts",
    "ServerEngine",
    "Subject",
    "decide",
    "decide_batch",
]
