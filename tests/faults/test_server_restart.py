"""The server is killed (SIGKILL) in the middle of a round and started again from its saved state.

Real processes: ``fltui server`` and two ``fltui --no-ui`` site services, each training in its
own worker process, every site behind its own fault proxy. Site-2's traffic is held in the
proxy so that the server dies with a round half done: one contribution received, one not.
The restarted server listens on another port (the proxies follow it). Every site must
register again within its retry budget, the contribution the dead server had received must be
sent again (same id) rather than lost, and nothing may be counted twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.demo import prepare_workspace
from tests.faults.procs import Proc, edit_json, start_server, start_site, wait_for
from tests.faults.proxy import FaultProxy

ROUNDS = 4
SITES = ("site-1", "site-2")


def _no_cross_site_validation(root: Path) -> None:
    for site in SITES:
        edit_json(
            root / site / "run_1" / f"mmar_{site}" / "config" / "config_fed_client.json",
            lambda d: d["client"].update(cross_site_validate=False),
        )


def _contribution_logged(server: Proc, rnd: int) -> list[tuple[str, str]]:
    """(site, contribution id) of every contribution the server logged for round ``rnd``."""
    found = []
    for message in server.logs(f"round {rnd}: contribution "):
        words = message.split()  # "round R: contribution CID from SITE (n_iter=...)"
        found.append((words[5], words[3]))
    return found


@pytest.mark.slow
def test_server_killed_mid_round_resumes_and_no_contribution_is_lost_or_counted_twice(
    tmp_path: Path,
) -> None:
    prepare_workspace(tmp_path, num_sites=2, num_rounds=ROUNDS, heartbeat_interval=0.5)
    _no_cross_site_validation(tmp_path)
    logs = tmp_path / "out"
    logs.mkdir()
    procs: list[Proc] = []
    proxies: list[FaultProxy] = []
    try:
        server, port = start_server(tmp_path / "server", logs / "server-1.log")
        procs.append(server)
        proxies = [FaultProxy(port) for _ in SITES]
        sites = {
            name: start_site(tmp_path / name, proxy.port, logs / f"{name}.log")
            for name, proxy in zip(SITES, proxies, strict=True)
        }
        procs += sites.values()
        held = proxies[1]

        # Round 1 goes normally. Then site-2 is held (nothing it sends reaches the server) until
        # a contribution of the next round has arrived and the round cannot close: kill there.
        rnd = 1
        wait_for(
            lambda: server.events("ServerRoundAggregated", round=1),
            120,
            f"round 1 to be aggregated; server said:\n{server.tail()}",
        )
        while True:
            rnd += 1
            assert rnd < ROUNDS, "never caught a round with one contribution of two"
            held.stall_after("up", 0)
            got = wait_for(
                lambda r=rnd: (
                    _contribution_logged(server, r)
                    or server.events("ServerRoundAggregated", round=r)
                ),
                90,
                f"a contribution to round {rnd}",
            )
            if isinstance(got[0], tuple) and len(got) == 1:
                break  # one of two in: the round is open
            held.release()  # site-2 had sent before it was held: the round closed; next one
            wait_for(lambda r=rnd: server.events("ServerRoundAggregated", round=r), 60, "close")
        ((early_site, early_cid),) = got
        server.kill()
        held.release()
        assert not server.events("ServerRoundAggregated", round=rnd)

        server2, port2 = start_server(tmp_path / "server", logs / "server-2.log")
        procs.append(server2)
        for proxy in proxies:
            proxy.set_target(port2)

        for name, site in sites.items():
            code = site.wait(180)
            assert code == 0, f"{name} exited with {code}:\n{site.tail()}"
        assert server2.wait(60) == 0, server2.tail()

        # The restarted server said what it resumed from, and finished every round.
        (resumed,) = server2.events("ServerResumed")
        assert resumed["round"] == rnd and resumed["sites"] == list(SITES), resumed
        assert [e["round"] for e in server2.events("ServerRoundAggregated")] == list(
            range(rnd, ROUNDS + 1)
        )
        state = json.loads((tmp_path / "server" / "state.json").read_text())
        assert state["finished"] and state["current_round"] == ROUNDS
        history = state["history"]
        assert [h["round"] for h in history] == list(range(1, ROUNDS + 1))
        for h in history:  # every round: each site exactly once, nobody missing
            assert sorted(h["contributions"]) == list(SITES), h
            assert h["missing"] == [], h
        ids = [c for h in history for c in h["contributions"].values()]
        assert len(ids) == len(set(ids)) == ROUNDS * len(SITES), "a contribution counted twice"
        # The contribution the dead server had received was sent again, not trained again.
        assert history[rnd - 1]["contributions"][early_site] == early_cid
        resent = sites[early_site].events("ContributionResent")
        assert [(e["round"], e["contribution_id"]) for e in resent] == [(rnd, early_cid)]
        for name, site in sites.items():
            # The console's and --no-ui's account of it: session lost, registered again.
            renewed = site.events("SessionRenewed")
            assert renewed, f"{name} never said it registered again:\n{site.tail()}"
            assert "restarted" in renewed[0]["reason"]
            finished = site.events("FederationFinished")
            assert [e["outcome"] for e in finished] == ["completed"], site.tail()
            rounds = [e["round"] for e in site.events("RoundCompleted")]
            assert rounds == list(range(1, ROUNDS + 1)), f"{name} round results: {rounds}"
    finally:
        for proc in procs:
            proc.stop()
        for proxy in proxies:
            proxy.close()
