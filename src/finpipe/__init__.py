"""finpipe: a workflow-orchestrated batch pipeline for deep learning on financial data.

The library (this package) is orchestrator-free: Prefect lives in `finpipe.tasks` and
`finpipe.flows` (the top-level `tasks/` and `flows/` folders).
"""

__version__ = "0.1.0"
