"""The operator's scenarios: what each does on the console, and the words of its page."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from engine.events import AdminRequestHandled, ConnectionChanged, LogRecord, RunChanged
from engine.site.paths import SitePaths
from engine.site.state import LOST_AFTER, PULSE_S, STALE_AFTER
from engine.status import ClientStatus
from fltui.bridge import RECONNECT_S
from fltui.runbook.harness import ROUNDS, Run


@dataclass(frozen=True)
class Scenario:
    number: int
    slug: str
    title: str
    intro: str
    sites: int
    play: Callable[[Run], Awaitable[None]]
    rounds: int = ROUNDS
    heartbeat_interval: float = 1.0
    retry_timeout: float = 30.0
    policy: dict[str, Any] | None = None
    peers_lockstep: bool = True
    task: str = "classification"  # the demo's task (engine.demo.TASKS): its MMAR and data
    service: bool = False  # the site runs as a service process; the console attaches to it


async def _first_start(run: Run) -> None:
    await run.registered()
    await run.shot(
        "registered",
        "The dashboard a moment after start",
        """
The header is the site's connection: the site's name, the server it talks to (from
`startup/fed_client.json`), whether TLS is on, the connection state (`registered`: the server
knows this site and gave it a session token), the age of the token and the last heartbeat with
its round trip. The end of the header says where the engine runs: here `engine in this
console`, because no site service ran for the workspace, so the console started the engine
itself; where the site runs as a service the header says `attached to service (pid N)` and
quitting the console leaves the site running. A red header means the connection is in
trouble: see [a site that lost its server](06-lost-server.md).

**Client** shows what the site's training is doing (`training not started` until a run is
started) and with which run, MMAR and worker process. **Round** shows the federation's round,
phase and progress once training runs. **GPUs** shows every GPU of this machine and which of
the site's processes use it; where there is none it says why and what to do (training then runs
on the CPU). **Requests** lists every admin request from the federation and every action taken
here, and **Logs** the site's log.
""",
    )
    await run.press("question_mark")
    await run.until(lambda: type(run.app.screen).__name__ == "HelpScreen", "the help screen")
    await run.shot(
        "help",
        "Every key, with `?`",
        """
`?` lists every key; any key closes the list. Keys that change what the site does (`a` abort,
`r` restart, `x` stop the site) ask before they act. `p` saves the screen as SVG and PNG under
the workspace's `screenshots/` folder, for a support ticket.
""",
    )
    await run.press("escape")
    await run.press("ctrl+p")
    await run.until(lambda: type(run.app.screen).__name__ == "CommandPalette", "the palette")
    await run.pilot.pause(0.5)
    await run.shot(
        "palette",
        "Every action and theme in the command palette (`ctrl+p`)",
        """
`ctrl+p` opens the command palette: type a few letters of an action (`dep`, `abort`) or a theme
and press Enter. `Esc` closes it.
""",
    )
    await run.press("escape")


async def _deploy_and_start(run: Run) -> None:
    await run.registered()
    await run.press("d")
    await run.until(lambda: type(run.app.screen).__name__ == "DeployScreen", "the deploy dialog")
    await run.shot(
        "deploy-dialog",
        "`d`: choose an MMAR and a run number",
        """
`d` lists the MMARs offered in the workspace's `transfer/` folder (or type the path of an MMAR
folder). The run number is the next free one: run 1 is already deployed here, so `2`. Choose
with the arrow keys; one Enter deploys (a refusal stays in the dialog, in red).
""",
    )
    await run.press("enter")
    await run.last_action("deploy: ")
    await run.shot(
        "deployed",
        "Deployed: `run_2/mmar_site-1`",
        """
The MMAR was checked whole before anything was written (no paths outside the MMAR, no links,
no code under `custom/` unless the site policy allows it), then copied to
`run_2/mmar_site-1/` in the workspace. The notice says what was done, and the Requests panel has
the action as the audit log records it (origin `local`: a key on this console; a request from
the federation shows the admin's name).
""",
    )
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.shot(
        "start-dialog",
        "`s`: start the run",
        """
`s` asks which deployed run to train (the newest by default) and, on a machine with several
GPUs, on how many.
""",
    )
    await run.press("enter")
    await run.last_action("start: ")
    await run.waiting_after(1)
    await run.shot(
        "training",
        "Training: round 1 is done here, the other site is still working",
        """
The status is `training started`, the worker process is named, and **Round** shows round 1 of
3. This site has trained its round (313 steps, the final loss), sent its contribution (the
`↑ contribution` line) and now waits for the server's next global model, which comes once the
other site has sent its own. Watching a round is the [next page](03-watch-a-round.md).
""",
    )


async def _watch_a_round(run: Run) -> None:
    await run.registered()
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.press("enter")

    async def round_1() -> None:
        await run.shot(
            "round-1",
            "Round 1: trained, contribution sent, waiting for the others",
            """
A round goes through these phases, shown after the round number: `pulling model` (the global
model comes down), `training` (the bar fills, with the step, the loss and an ETA),
`submitting` (the difference between the trained and the global model goes up), `waiting for
the others`, then `validating global model` once the server has averaged every site's
contribution. Here this site has finished round 1 and waits for the server's next global model:
the bar is full (313 of 313 steps), the loss is the last step's, and `↑ contribution` is the
upload just made.

Nothing to do while a round runs. A site that waits much longer than its peers usually waits
for a slow or stopped peer: the federation's admin sees which one.
""",
            advance=12,
        )

    async def round_2() -> None:
        await run.shot(
            "round-2",
            "Round 2: the global model after round 1, measured here",
            """
When a round closes, each site measures the new global model on its own validation data:
`global accuracy` lists these values round after round (the newest last). The site has trained
round 2 and waits again.
""",
            advance=12,
        )

    await run.rounds_in_lockstep(ROUNDS, {1: round_1, 2: round_2})
    await run.finished()
    await run.shot(
        "completed",
        "The federation completed",
        """
After the last round the status reads `training stopped — federation completed`, the worker
process has exited (`no worker`), and **Round** shows the global accuracy of every round with a
sparkline, and the final value. Before it stopped, the site ran cross-site validation (see
[page 5](05-cross-site-validation.md)).

The GPU panel shows the same at every step on a machine without GPUs. With GPUs, each has a line
with its utilisation and history, memory, temperature and power, and the processes of this
site that use it (`ours`).
""",
    )


async def _abort_and_restart(run: Run) -> None:
    await run.registered()
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.press("enter")
    await run.waiting_after(1)
    await run.press("a")
    await run.until(lambda: type(run.app.screen).__name__ == "ConfirmScreen", "the question")
    await run.shot(
        "abort-asks",
        "`a`: abort asks first",
        """
`a` stops the site's training after a question (`y` or Enter: abort, `n` or Esc: go on
training). Abort when the federation's admin asks for it, when the run is the wrong one, or
when the machine is needed for something else.
""",
    )
    await run.press("y")
    await run.last_action("abort: ")
    await run.until(lambda: run.state.worker_pid is None, "the worker is gone")
    await run.until(lambda: run.state.outcome == "aborted", "the outcome is shown")
    await run.shot(
        "aborted",
        "Aborted: no worker is left",
        """
The worker got an abort command, then SIGTERM to its whole process group, then SIGKILL: the
action returns only when no process of the group is left, so no orphan holds a GPU. The status
is `training stopped`, the worker is gone (`no worker`), and **Requests** has `train.abort`.
The site is still registered with the server: start again with `s`, or restart the engine with
`r` for a fresh session.
""",
    )
    registrations = sum(1 for e in run.bridge.of(ConnectionChanged) if e.state == "registered")
    await run.press("r")
    await run.until(lambda: type(run.app.screen).__name__ == "ConfirmScreen", "the question")
    await run.shot(
        "restart-asks",
        "`r`: restart the site engine",
        """
`r` restarts the site's engine, after a question: training stops, the site says goodbye to the
server and registers again with a new session. Use it after the server was restarted, when the
site's session was dropped, or after changing `startup/` files.
""",
    )
    # Right after a heartbeat: the old engine closes its channel before its next one is due
    # (a heartbeat racing the close would add a warning to the picture, or not).
    beats = run.heartbeats()
    await run.until(lambda: run.heartbeats() > beats, "a heartbeat", 30)
    await run.press("y")
    await run.last_action("restart: ")
    await run.registered(after=registrations)
    await run.shot(
        "restarted",
        "Restarted: a new session",
        """
The engine registered again: the token is new (its age starts again) and **Requests** lists
`train.restart`. The site waits for the next `s` or for the federation's `start`.
""",
    )


async def _cross_site_validation(run: Run) -> None:
    await run.registered()
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.press("enter")
    await run.rounds_in_lockstep(2)
    await run.finished()
    await run.shot(
        "completed",
        "The run completed; cross-site validation ran at its end",
        """
With `cross_site_validate: true` in the MMAR's `config_fed_client.json` (the demo MMAR has it),
every site sends its best local model to the server after the last round, and every site
validates every model (each site's and the server's global one) on its own validation data.
**Round** shows what this site measured, one number per model (`cross-site accuracy: server …
· site-1 … · site-2 …`); **Client** keeps the run's outcome.
""",
        heartbeat=True,
    )
    before = len(run.bridge.of(LogRecord))
    runs = len(run.bridge.of(RunChanged))
    await run.press("v")
    await run.last_action("validate: ")
    await run.until(
        lambda: any(
            "cross-site validation done" in e.message for e in run.bridge.of(LogRecord)[before:]
        ),
        "the validation finished",
        120,
    )
    await run.until(
        lambda: (
            any(not e.running for e in run.bridge.of(RunChanged)[runs:])
            and run.state.status == ClientStatus.TRAINING_STOPPED
        ),
        "the validation worker exited",
        60,
    )
    await run.shot(
        "validated",
        "`v`: validate again, on this site's data",
        """
`v` runs cross-site validation again on this site's data (the federation's admin can ask for
it too: `fltui admin … validate all`). It runs in a worker process like training; meanwhile
**Client** says `cross site validation`, and **Round** fills in each model's result as it comes.
The log says how many models were validated.
""",
    )
    results = _cross_site_table(run)
    run.page.steps[-1].extra = (
        "Each model's results are events of the site (`CrossSiteValidated`), in "
        "`logs/events.jsonl` of the workspace and in `fltui --no-ui --json` output:\n\n"
        "```sh\ngrep CrossSiteValidated logs/events.jsonl\n```\n\n" + results
    )


def _cross_site_table(run: Run) -> str:
    path = SitePaths(run.fed.site).logs / "events.jsonl"
    rows: dict[str, dict[str, float]] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                if data.get("event") == "CrossSiteValidated":
                    rows[str(data["model_owner"])] = data["metrics"]  # the newest wins
    if not rows:
        return "(no results were recorded)"
    lines = [
        "| model of | accuracy on site-1's data | loss |",
        "|---|---|---|",
    ]
    for owner in sorted(rows):
        metrics = rows[owner]
        lines.append(
            f"| {owner} | {metrics.get('accuracy', float('nan')):.3f} "
            f"| {metrics.get('loss', float('nan')):.3f} |"
        )
    return (
        "\n".join(lines)
        + "\n\nThe `server` row is the final global model; a site's row is its best local "
        "model. A site's own model usually does best on its own data (the demo's data is "
        "non-IID); the global model should do well everywhere."
    )


async def _lost_server(run: Run) -> None:
    await run.registered()
    await run.fresh_heartbeat()
    run.fed.stop_server()
    # The next heartbeat is due heartbeat_interval (30 s) after the last one: the clock says so.
    run.clock.advance(30)
    await run.until(
        lambda: any("heartbeat to" in e.message for e in run.bridge.of(LogRecord)),
        "a heartbeat failed",
        60,
    )
    await run.until(
        lambda: any("admin Retrieve" in e.message for e in run.bridge.of(LogRecord)),
        "the admin channel failed",
        30,
    )
    await run.shot(
        "server-gone",
        "The server stopped answering",
        """
The first signs: the last heartbeat gets older in the header (`heartbeat 30 s ago`), and the
log has one warning for the failed heartbeat and one for the admin channel (which polls the
server for the federation's requests). The connection state still reads `registered`: nothing
else has talked to the server yet. A site that is training notices at its next call (next
step).
""",
        advance=5,
        heartbeat=False,
    )
    stopped = len(run.bridge.of(RunChanged))
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.press("enter")
    await run.until(lambda: run.state.outcome == "failed", "training failed", 120)
    await run.until(
        lambda: any(not e.running for e in run.bridge.of(RunChanged)[stopped:]),
        "the worker exited",
        60,
    )
    await run.shot(
        "failed",
        "Training cannot reach the server: retried, then failed",
        """
Training's calls to the server are retried with backoff for `retry_timeout` seconds (from the
MMAR's `config_fed_client.json`, else the startup kit's; 5 s in this runbook, 30 s in the demo
MMAR). Meanwhile the header turns red and says
`retrying`; then `failed`, the client panel shows the last error (here gRPC's words:
connection refused), and the round panel `federation failed`.

What to do:

1. Ask the federation's admin whether the server is up (the address is in the header and in
   `startup/fed_client.json`).
2. From this machine, check that the server's port can be reached (`nc -vz HOST PORT`): a
   firewall, a proxy or a changed address shows here as `connection refused` or a timeout.
3. TLS or authentication failures are not retried and say so in the header's place of
   `failed` (see Secure federation in the README): those need the admin's new kit, not a retry.
4. Once the server is back, restart the site engine with `r` (next step).
""",
        advance=30,
        heartbeat=False,
    )
    registrations = sum(1 for e in run.bridge.of(ConnectionChanged) if e.state == "registered")
    logs = len(run.bridge.of(LogRecord))
    await run.press("r")
    await run.until(lambda: type(run.app.screen).__name__ == "ConfirmScreen", "the question")
    await run.press("y")
    # The new engine tries to register while the server is still down; the server comes back
    # before its retries run out. (A channel that waited for a dead server reconnects after a
    # backoff of its own: starting the server first would make the picture depend on it.)
    await run.until(
        lambda: any(
            "Register to" in e.message and "retrying" in e.message
            for e in run.bridge.of(LogRecord)[logs:]
        ),
        "the new engine tried to register",
        60,
    )
    run.fed.start_server()  # on the same port
    await run.registered(after=registrations)
    await run.last_action("restart: ")
    await run.shot(
        "back",
        "The server is back: `r`, registered again",
        """
`r` restarted the site's engine: the old session was closed (the server could not be told:
`quit failed`), and the new engine registered, retrying until the server answered (one warning
for the first failed try). The header is `registered` again, with a fresh token and heartbeat.
The last error stays on the client panel until the next run starts. Start training again with
`s`, or wait for the federation's `start`.

A site whose server comes back while its engine runs also registers again by itself at its next
heartbeat (`the server no longer knows this site; registering again`); `r` does it at once.
""",
    )


async def _segmentation_demo(run: Run) -> None:
    await run.registered()
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.press("enter")

    async def round_1() -> None:
        await run.shot(
            "round-1",
            "Round 1: a MONAI UNet trained on this site's volumes",
            """
The run is the segmentation MMAR (`seg_mmar`), deployed unchanged to both sites: Clara's
PyTorch form of `config/config_train.json`, trained by MONAI's own `SupervisedTrainer` (a 3D
UNet, Dice loss, Adam). Each site reads its own data: `local/environment.json` in the site's
workspace sets the MMAR's `DATA_ROOT` and `DATASET_JSON` to `local/data/`, where the demo wrote
8 training and 4 validation volumes of 32×32×32 voxels at first run. The data is synthetic:
MONAI's `create_test_image_3d` (spheres on noise), a different seed per site, written as NIfTI.

**Round** shows round 1 trained here (the bar full: 4 steps, 2 local epochs of 2 batches of 4
volumes) and the contribution sent; the site now waits for the next global model, which comes
once the other site has sent its own. **Logs** says which variables the site's
`local/environment.json` set, and has the MMAR's notices: `amp` is off on a CPU, and the
config's MONAI 0.5 argument `dimensions` was translated to `spatial_dims`.
""",
            advance=12,
        )

    async def round_3() -> None:
        await run.shot(
            "round-3",
            "Round 3: Dice of the global model, round by round",
            """
When a round closes, this site validates the new global model on its own 4 validation volumes
with the MMAR's key metric, `val_mean_dice` (MONAI's `MeanDice` over the foreground, after a
sliding-window inference of 32×32×32 windows). **Round** lists the values of each round, the
newest last: the Dice of the averaged model climbs as the sites train.
""",
            advance=12,
        )

    await run.rounds_in_lockstep(4, {1: round_1, 3: round_3})
    await run.finished()
    await run.shot(
        "completed",
        "The federation completed: the Dice of every round",
        """
After the last round the status reads `training stopped — federation completed`. **Round**
shows the Dice of the global model of every round with its sparkline, and above it the
cross-site validation on this site's volumes: the server's final global model and each site's
best local model (`models/best_model.pt` of the run's MMAR: the best Dice after local
training). The same demo on any machine: `fltui demo --task segmentation` (three sites, five
rounds).
""",
    )


POLICY = {
    "allow_byoc": False,
    "allowed_commands": ["check_status", "sys_info", "validate", "abort", "shell"],
    "read_only": False,
    "max_deploy_bytes": 2147483648,
    "shell_timeout": 10,
    "shell_max_output": 65536,
}


async def _refused_request(run: Run) -> None:
    await run.registered()
    outputs = []
    for words in (
        ["check_status", "client", "site-1"],
        ["set_run_number", "2"],
        ["deploy", "demo_mmar", "client", "site-1"],
    ):
        done = await asyncio.to_thread(run.fed.admin, *words)
        text = run.bridge.stand_ins.text((done.stdout + done.stderr).strip())
        outputs.append(f"$ fltui admin --workspace ADMIN_KIT {' '.join(words)}\n{text}")
    await run.until(
        lambda: (
            [e.topic for e in run.bridge.of(AdminRequestHandled)]
            == ["train.check_status", "train.deploy"]
        ),
        "both requests reached the site",
        60,
    )
    await run.shot(
        "refused",
        "A request that the site policy refuses",
        """
The federation's admin asked this site for its status (allowed) and then to deploy an MMAR,
which this site's policy does not allow: **Requests** lists both, with their origin (the
admin's name, from the admin's certificate where the federation uses TLS) and outcome
`refused`; the highlighted request's reason is on the panel's lower border. The admin got an
error reply naming the rule; the site did nothing else.
""",
        extra="The admin's side:\n\n```text\n" + "\n\n".join(outputs) + "\n```",
    )
    from fltui.screens.request import RequestScreen  # deferred: textual, once a scenario plays
    from fltui.widgets.requests_panel import RequestsPanel  # deferred: textual, as above

    run.dash.query_one(RequestsPanel).focus()
    await run.press("enter")
    await run.until(lambda: isinstance(run.app.screen, RequestScreen), "the request opened")
    await run.shot(
        "request",
        "Enter on a request: all of it",
        """
`enter` on a request opens it whole: who asked, when, the outcome, and the reason of a refusal
word for word, as the admin was told. The arrows choose the request (**Requests** has the keys
when the console opens; `tab` moves them between it and the log). `esc` closes it.
""",
    )
    await run.press("escape")
    await run.shot(
        "policy",
        "Why: the site's policy and the audit log",
        """
The policy is the site's own file, `startup/site_policy.json` (`fltui check-config` checks it).
Here it lets the federation check status, ask for system information and validation, run
read-only shell commands and abort, but not deploy or start: those stay with the site's
operator (`d`, `s`). A missing file allows every command; `read_only: true` allows only
`check_status`, `sys_info` and `shell`.

Every request, allowed or not, and every local action is one line of `logs/audit.jsonl` in
the workspace, with the reason for a refusal. For a question about a request, look there.
""",
        extra=_policy_and_audit(run),
    )


def _policy_and_audit(run: Run) -> str:
    paths = SitePaths(run.fed.site)
    policy = json.dumps(POLICY, indent=1)
    audit = []
    stamped = run.bridge.of(AdminRequestHandled)
    with contextlib.suppress(OSError):
        lines = (paths.logs / "audit.jsonl").read_text().splitlines()
        for line, event in zip(lines, stamped, strict=False):
            record = json.loads(line)
            # the file has the real time; the runbook shows the fixed clock's, as on screen
            record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S.000+00:00", time.gmtime(event.ts))
            record["detail"] = run.bridge.stand_ins.text(str(record.get("detail", "")))
            audit.append(json.dumps(record, ensure_ascii=False))
    return (
        "`startup/site_policy.json`:\n\n```json\n"
        + policy
        + "\n```\n\n`logs/audit.jsonl`:\n\n```json\n"
        + "\n".join(audit)
        + "\n```"
    )


# The service's age in the pictures of a dead service: past STALE_AFTER pulses, then past
# LOST_AFTER (whole seconds: the header shows whole seconds).
STALE_SHOT_S = float(int(STALE_AFTER * PULSE_S) + 1)  # 4 s
LOST_SHOT_S = float(int(LOST_AFTER * PULSE_S) + 1)  # 9 s


async def _service_died(run: Run) -> None:
    await run.until(lambda: run.state.connection == "registered", "the service registered", 60)
    await run.press("s")
    await run.until(lambda: type(run.app.screen).__name__ == "StartScreen", "the start dialog")
    await run.press("enter")
    await run.last_action("start: ")
    await run.waiting_after(1)
    await run.shot(
        "attached",
        "The console attached to the site service, training",
        """
The site runs as a service of its own (`fltui --no-ui --serve --workspace DIR`, as systemd or
an operator starts it), and the console attached to it: the header ends with `attached to
service (pid 1201)`, and quitting the console would leave the site running. The service says
it is alive every 2 s; every event and every pulse confirms what the panels show. Here the
site has trained round 1 and waits for the other site.
""",
    )
    # The last word from the service at the clock's current reading: its age on screen is then
    # exactly the clock's moves after the kill.
    await run.fresh_heartbeat()
    run.fed.kill_service()
    await run.until(lambda: not run.state.service_connected, "the console saw the link drop", 30)
    await run.until(
        lambda: any("lost the site service" in e.message for e in run.bridge.of(LogRecord)),
        "the console said so",
        30,
    )
    run.clock.advance(STALE_SHOT_S)
    await run.shot(
        "stale",
        f"`kill -9` of the service: stale, {STALE_SHOT_S:.0f} s later",
        f"""
The service process was killed with SIGKILL (`kill -9`: no goodbye, no clean-up), as a crash
or the kernel's out-of-memory killer would end it. The console saw its connection drop and
says what it last knew, and how old that is, instead of carrying on as if nothing happened:
the header reads `service lost · reconnecting · last heard {STALE_SHOT_S:.0f} s ago` (dimmed),
**Client** adds `{STALE_SHOT_S:.0f} s ago, unconfirmed` to the last status, and **Round** has
no progress bar or ETA any more, only the last step and its age. **Logs** has the console's
own warning: `lost the site service (pid 1201) …; waiting for it to come back`. The console
tries to attach again for {RECONNECT_S:.0f} s.

Nothing to do yet: a service managed by systemd is started again within seconds
(`Restart=on-failure`), and the console attaches to it by itself.

*Simulated here: the {STALE_SHOT_S:.0f} s.* The kill and the console's reaction are real;
the runbook's fixed clock was moved on {STALE_SHOT_S:.0f} s after the kill instead of waiting
for them (the service is stale once unconfirmed for {STALE_AFTER:g} pulses, {
            STALE_AFTER * PULSE_S:g} s, or at once when its connection drops).
""",
        advance=LOST_SHOT_S - STALE_SHOT_S,
        heartbeat=False,
    )
    await run.shot(
        "lost",
        f"Still gone after {LOST_SHOT_S:.0f} s: lost, state unknown",
        f"""
Unconfirmed for more than {LOST_AFTER:g} pulses ({LOST_AFTER * PULSE_S:g} s), the service is
lost: the header turns red and reads `service lost {LOST_SHOT_S:.0f} s ago — state unknown`
(and `heartbeat unknown`: the server's answers came through the service). The panels say what
is unknown rather than repeat the last state: **Client** `unknown — service lost
{LOST_SHOT_S:.0f} s ago` and `worker pid 1101: unknown` (a worker whose service died stops
itself), **Round** `round 1 of 3 · state unknown` with the last thing seen and its age.

What to do:

1. See whether the service is running: `fltui ctl --workspace DIR status` (exit code 5: no
   service runs), `systemctl status fltui-site` where systemd manages it.
2. Find why it died: the end of `logs/` in the workspace, `journalctl -u fltui-site`, and
   the kernel's log for the out-of-memory killer (`journalctl -k | grep -i oom`).
3. Start it again (`systemctl start fltui-site`, or `fltui --no-ui --serve --workspace DIR`):
   this console attaches to it by itself within {RECONNECT_S:.0f} s (else quit and start it
   again).

*Simulated here: the {LOST_SHOT_S:.0f} s* (the fixed clock moved on again, as on the last
step).
""",
        heartbeat=False,
    )
    logs = len(run.bridge.of(LogRecord))
    # The runbook stands in for systemd or the operator: the same command starts it again.
    await asyncio.to_thread(run.fed.start_service)
    await run.until(
        lambda: any("re-attached" in e.message for e in run.bridge.of(LogRecord)[logs:]),
        "the console attached again",
        60,
    )
    await run.until(
        lambda: run.state.service_connected and run.state.connection == "registered",
        "the new service registered",
        60,
    )
    await run.shot(
        "back",
        "The service is back: attached again, every value confirmed",
        """
The service was started again (here by the runbook, with the command systemd would run) and
the console attached to it by itself: the header is `attached to service (pid 1202)` in its
normal colours, the new service registered with the server (a new token, `heartbeat 0 s
ago`), and **Client** and **Round** show what the new service confirms.

A killed service's training does not survive it: the run stopped with the service (its worker
stopped itself), and the new service waits for a command (`training not started`). Start the
run again with `s`, or wait for the federation's `start`; the federation's admin sees this
site's new session.
""",
    )


SCENARIOS = [
    Scenario(
        1,
        "first-start",
        "First start: connect and read the dashboard",
        """
An operator starts the console on the site's machine (`fltui --workspace DIR`, or with the
site running as a service, the same command attaches to it). The console connects to the
federation's server named in the startup kit and shows the site at a glance.
""",
        sites=1,
        play=_first_start,
    ),
    Scenario(
        2,
        "deploy-and-start",
        "Deploy an MMAR and start a run",
        """
An MMAR (the training's configuration, code and models, in Clara's layout) is deployed into a
numbered run and then started. Here the operator does both with keys; the federation's admin
can do the same from `fltui admin` where the site policy allows it.
""",
        sites=2,
        play=_deploy_and_start,
    ),
    Scenario(
        3,
        "watch-a-round",
        "Watch a round: phases, progress, metrics, GPUs",
        """
Once a run is started, the console follows it round by round. This federation has two sites
and 3 rounds of federated averaging on the demo's synthetic data.
""",
        sites=2,
        play=_watch_a_round,
    ),
    Scenario(
        4,
        "abort-and-restart",
        "Abort a run and restart the client",
        """
Stopping a run and giving the site a fresh session with the server: two keys, each asking
first.
""",
        sites=2,
        play=_abort_and_restart,
        heartbeat_interval=5.0,
    ),
    Scenario(
        5,
        "cross-site-validation",
        "Cross-site validation and reading its results",
        """
Cross-site validation measures every site's model, and the server's global model, on every
site's own data: it shows whether the federated model works here, and how far the sites' data
differ.
""",
        sites=2,
        rounds=2,
        play=_cross_site_validation,
    ),
    Scenario(
        6,
        "lost-server",
        "A site that lost its server: what the screen says and what to do",
        """
The server stops answering (it crashed, was restarted, or the network between the site and
the server broke). What the console shows, in order, and how to get the site back.
""",
        sites=1,
        play=_lost_server,
        heartbeat_interval=30.0,
        retry_timeout=5.0,
    ),
    Scenario(
        7,
        "refused-request",
        "A refused request (site policy) and the audit trail",
        """
The site decides what the federation may ask of it, in its policy file. A request the policy
does not allow is refused with a reason, and every request is in the audit log.
""",
        sites=1,
        play=_refused_request,
        policy=POLICY,
    ),
    Scenario(
        8,
        "segmentation-demo",
        "The segmentation demo: a MONAI UNet on NIfTI volumes, Dice per round",
        """
`fltui demo --task segmentation` federates a MONAI segmentation MMAR (Clara's PyTorch form:
3D UNet, Dice loss, `MeanDice` as the key metric) over synthetic NIfTI volumes that each site
keeps in its own `local/data/`. Here two sites train four rounds; the console follows site-1.
""",
        sites=2,
        rounds=4,
        play=_segmentation_demo,
        task="segmentation",
    ),
    Scenario(
        9,
        "service-died",
        "The site's service died: stale, lost, and back",
        """
The site runs as a service process, and the console is attached to it. The service is killed
(`kill -9`) while training runs: what the console shows as time passes, what it means and what
to do, and the console once the service is started again. The kill is real; how long the
service has been gone is simulated by moving the runbook's fixed clock (each such step says
so).
""",
        sites=2,
        play=_service_died,
        service=True,
    ),
]
