"""Flow runs whose machine died ("zombies"): heartbeats, and the automation that ends them.

A flow run whose process is SIGKILLed, or whose host loses power, cannot report its end, so
the Prefect server would show it `Running` for ever. Prefect 3's answer (docs: "How to detect
and respond to zombie flows"): the flow-run engine sends a `prefect.flow-run.heartbeat` event
every PREFECT_FLOWS_HEARTBEAT_FREQUENCY seconds, and a proactive automation marks a run
`Crashed` when, after a heartbeat, neither another heartbeat nor a final state follows within
a few beats. Every client of the stack (the Prefect worker and its flow runs, the Dask
workers, a shell with stack.env) gets `finpipe.services.stack.heartbeat_env()`: a flow run
that beats less often, e.g. at Prefect's default of 180 s, would be ended while alive.
`finpipe stack up` creates the automation (`python -m finpipe.flows.zombies`, one-shot,
beside the deployments job); a deployment run whose worker died shows `Crashed` about
MISSED_HEARTBEATS x HEARTBEAT_SECONDS after its last beat. It lives with the flows because
it talks to Prefect: the library (`src/finpipe`) stays free of the orchestrator.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import TYPE_CHECKING

from finpipe.services.stack import HEARTBEAT_SECONDS

if TYPE_CHECKING:
    from uuid import UUID

    from prefect.events.schemas.automations import AutomationCore

log = logging.getLogger("finpipe.flows.zombies")

MISSED_HEARTBEATS = 10  # 300 s: beats from a run on a machine at load 80 came 2 minutes late
AUTOMATION_NAME = "finpipe: flow runs that stopped beating are crashed"
FINAL_EVENTS = (
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
)


def zombie_automation(heartbeat_seconds: int = HEARTBEAT_SECONDS) -> AutomationCore:
    """The automation (not yet created) that marks a flow run `Crashed` when no heartbeat and
    no final state follow its last heartbeat within MISSED_HEARTBEATS beats."""
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    silence = dt.timedelta(seconds=MISSED_HEARTBEATS * heartbeat_seconds)
    return AutomationCore(
        name=AUTOMATION_NAME,
        description=(
            f"A flow run that sent a heartbeat, then neither another one nor a final state "
            f"within {silence.seconds} s, lost its process or machine: mark it Crashed."
        ),
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=silence,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"No heartbeat for {silence.seconds} s: its process or machine died.",
            )
        ],
    )


def ensure_zombie_automation(heartbeat_seconds: int = HEARTBEAT_SECONDS) -> UUID:
    """Create the automation on the Prefect API of the current settings, replacing any of the
    same name (so a changed definition applies on the next `up`); return its id."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(AUTOMATION_NAME):
            client.delete_automation(old.id)
        created = client.create_automation(zombie_automation(heartbeat_seconds))
    log.info("automation %r created (%s)", AUTOMATION_NAME, created)
    return created


if __name__ == "__main__":  # the stack's one-shot job: PREFECT_API_URL and auth in the env
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ensure_zombie_automation()
