"""Flow runs whose machine died (finpipe.flows.zombies): the stack's worker makes its flow
runs send heartbeats, and the automation that marks a silent run Crashed is created on a real
Prefect API (this session's), once however often `up` runs.

Not covered here: a run actually marked Crashed (that takes ten missed beats, 300 s, on the
stack's server with its triggers service; see the README's team-stack section).
"""

from __future__ import annotations

import datetime as dt

from finpipe.flows import zombies

from finpipe.services import stack


def _automations():
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_automations_by_name(zombies.AUTOMATION_NAME)


def test_the_automation_is_created_once_and_crashes_runs_that_stop_beating():
    first = zombies.ensure_zombie_automation()
    second = zombies.ensure_zombie_automation()  # a second `up`: replaced, not doubled
    (automation,) = _automations()
    assert automation.id == second != first and automation.enabled
    trigger = automation.trigger
    assert trigger.posture == "Proactive"
    assert trigger.after == {"prefect.flow-run.heartbeat"}
    assert trigger.expect == {"prefect.flow-run.heartbeat", *zombies.FINAL_EVENTS}
    assert trigger.for_each == {"prefect.resource.id"}
    assert trigger.match.get("prefect.resource.id") == ["prefect.flow-run.*"]
    assert trigger.within == dt.timedelta(seconds=10 * zombies.HEARTBEAT_SECONDS)
    (action,) = automation.actions
    assert action.type == "change-flow-run-state" and action.state == "CRASHED"


def test_every_client_of_the_stack_beats_often_enough_for_the_automation(tmp_path):
    from prefect.settings.models.flows import FlowsSettings

    folder = stack.StackFolder(tmp_path)
    ports = dict.fromkeys(stack.PORT_NAMES, 1234)
    values = stack.stack_values(stack.generate_credentials(), ports, folder)
    *_, dask_workers, worker = stack._commands(values, ports, folder)
    for command in (worker, *dask_workers):  # and stack.env's client block
        assert command.env["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30", command.name
    assert "PREFECT_FLOWS_HEARTBEAT_FREQUENCY" in stack.CLIENT_SETTINGS
    beat = int(values["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"])
    assert FlowsSettings(heartbeat_frequency=beat).heartbeat_frequency == beat
    # The automation waits for several missed beats, not one late one.
    assert zombies.MISSED_HEARTBEATS * beat >= 90
