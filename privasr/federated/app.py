"""The Flower app (Message API): ``server_app`` and ``client_app``; ``run_simulation_fl``.

Messages. Every message carries the recipe (``config.recipe``, JSON) so a ClientApp needs no
other configuration than where it finds its speaker's data:
    query  server → node: "which speaker are you?"  → config.speaker
    train  server → node: arrays = the server model  → arrays = Δ (trainable tensors)
A node is one speaker: ``node_config["speaker"]`` names it, or ``node_config["partition-id"]``
indexes the sorted speakers of the training manifest (the Simulation Runtime sets it).

Deployment (the same app, see README "Federated learning"): SuperLink + one SuperNode per
speaker, and ``flwr run`` with ``run_config`` ``config=<recipe.yaml>``.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

from privasr.federated.env import flower_env

flower_env()

import torch  # noqa: E402  (ArrayRecord's torch helpers need torch imported)
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message,  # noqa: E402
                      MetricRecord, RecordDict)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from tqdm import tqdm  # noqa: E402

from privasr.config import from_dict, to_dict  # noqa: E402
from privasr.federated.client import (local_update, speakers_of,  # noqa: E402
                                      warm_feature_cache)
from privasr.federated.config import FLConfig, SimulationConfig, load_fl_config  # noqa: E402
from privasr.federated.server import FLServer, run_rounds  # noqa: E402
from privasr.data.splits import manifest_paths  # noqa: E402
from privasr.train.host_memory import keep_freed_memory  # noqa: E402

__all__ = ["client_app", "server_app", "make_server_app", "run_server", "run_simulation_fl"]


# -- client ------------------------------------------------------------------------------------
def _recipe(msg: Message) -> FLConfig:
    return from_dict(FLConfig, json.loads(str(msg.content["config"]["recipe"])))


def _speaker(cfg: FLConfig, ctx: Context) -> tuple[str, int]:
    nc = ctx.node_config
    speakers = speakers_of(manifest_paths(cfg)["train"])
    if "speaker" in nc:
        name = str(nc["speaker"])
        if name not in speakers:
            raise ValueError(f"node_config speaker {name!r} is not in the training manifest")
        return name, speakers.index(name)
    if "partition-id" not in nc:
        raise ValueError("node_config needs speaker=<id> or partition-id=<index>")
    pid = int(nc["partition-id"])
    if not 0 <= pid < len(speakers):
        raise ValueError(f"partition-id {pid} out of range: {len(speakers)} speakers")
    return speakers[pid], pid


client_app = ClientApp()


@client_app.query()
def _query(msg: Message, ctx: Context) -> Message:
    name, _ = _speaker(_recipe(msg), ctx)
    return Message(RecordDict({"config": ConfigRecord({"speaker": name})}), reply_to=msg)


@client_app.train()
def _train(msg: Message, ctx: Context) -> Message:
    cfg = _recipe(msg)
    torch.set_num_threads(max(1, cfg.threads))
    keep_freed_memory()
    name, index = _speaker(cfg, ctx)
    state = msg.content["arrays"].to_torch_state_dict()
    t0 = time.perf_counter()
    res = local_update(cfg, state, name, round_=int(msg.content["config"]["round"]),
                       client_seed=index)
    seconds = time.perf_counter() - t0          # local training only (no transport)
    return Message(RecordDict({
        "arrays": ArrayRecord(res.delta),
        "metrics": MetricRecord({"steps": res.steps, "utterances": res.utterances,
                                 "train_seconds": seconds}),
        "config": ConfigRecord({"speaker": name})}), reply_to=msg)


# -- server ------------------------------------------------------------------------------------
def _wait_for_nodes(grid: Grid, want: int, patience: float) -> list[int]:
    """Node ids once ``want`` have registered, or once the count was stable ``patience`` s."""
    nodes: list[int] = []
    last_change = time.time()
    while True:
        now = list(grid.get_node_ids())
        if len(now) != len(nodes):
            nodes, last_change = now, time.time()
        if len(nodes) >= want or (nodes and time.time() - last_change > patience):
            return nodes
        if not nodes and time.time() - last_change > 10 * patience:
            raise RuntimeError(f"no SuperNode connected within {10 * patience:.0f} s")
        time.sleep(0.2)


def _speaker_nodes(grid: Grid, server: FLServer, recipe: str, log) -> dict[str, int]:
    nodes = _wait_for_nodes(grid, server.population, patience=10.0)
    msgs = [Message(RecordDict({"config": ConfigRecord({"recipe": recipe})}), dst_node_id=n,
                    message_type="query", group_id="discover") for n in nodes]
    mapping: dict[str, int] = {}
    for rep in grid.send_and_receive(msgs, timeout=120.0):
        if rep.has_error():
            log(f"node {rep.metadata.src_node_id} did not say its speaker: "
                f"{rep.error.reason[:200]}")
            continue
        mapping[str(rep.content["config"]["speaker"])] = rep.metadata.src_node_id
    missing = len(set(server.speakers) - set(mapping))
    log(f"{len(mapping)} speaker nodes connected" + (f"; {missing} speakers have no node "
                                                     "(they count as failed when sampled)"
                                                     if missing else ""))
    return mapping


def run_server(grid: Grid, cfg: FLConfig, log: Callable[[str], Any] = print, *,
               workers: int | None = None) -> dict:
    """The server side of a run on any Flower Grid (simulation or deployment). ``workers``:
    how many clients train at once (simulation: num_cpus // client_cpus; None: one node per
    client, every client of a cohort at once)."""
    server = FLServer(cfg, log=log)
    recipe = json.dumps(to_dict(cfg))
    nodes = _speaker_nodes(grid, server, recipe, log)
    timeout = cfg.server.round_timeout or None

    def train_cohort(round_: int, cohort: list[str]) -> tuple[list, int, list[float]]:
        arrays = ArrayRecord(server.global_state())
        msgs = [Message(RecordDict({"arrays": arrays,
                                    "config": ConfigRecord({"recipe": recipe, "round": round_})}),
                        dst_node_id=nodes[s], message_type="train", group_id=str(round_))
                for s in cohort if s in nodes]
        deltas, seconds = [], []
        for rep in exchange(grid, msgs, timeout=timeout, progress=cfg.progress,
                            desc=f"round {round_ + 1} clients"):
            if rep.has_error():
                log(f"round {round_}: client {rep.metadata.src_node_id} failed: "
                    f"{rep.error.reason.strip().splitlines()[-1][:300]}")
                continue
            deltas.append(rep.content["arrays"].to_torch_state_dict())
            seconds.append(float(rep.content["metrics"].get("train_seconds", math.nan)))
        return deltas, len(cohort) - len(deltas), seconds

    return run_rounds(server, train_cohort, workers=workers)


def exchange(grid: Grid, msgs: list[Message], *, timeout: float | None, progress: bool,
             desc: str, pull_interval: float = 0.1) -> list[Message]:
    """Flower's ``send_and_receive`` (push, then pull until every reply is in or ``timeout``
    passes) with a bar over the replies."""
    ids = set(grid.push_messages(msgs))
    end = None if timeout is None else time.time() + timeout
    replies: list[Message] = []
    with tqdm(total=len(ids), desc=desc, unit="client", leave=False, disable=not progress,
              dynamic_ncols=True) as bar:
        while ids and (end is None or time.time() < end):
            got = list(grid.pull_messages(ids))
            replies.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            bar.update(len(got))
            if ids:
                time.sleep(pull_interval)
    return replies


def make_server_app(cfg: FLConfig | None = None, log: Callable[[str], Any] = print) -> ServerApp:
    """A ServerApp running ``cfg``, or the recipe named by ``run_config["config"]``."""
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        recipe = cfg
        if recipe is None:
            rc = context.run_config
            if "config" not in rc:
                raise ValueError("run_config needs config=<fl recipe YAML> (flwr run ... "
                                 "--run-config \"config='configs/fl_dp.yaml'\")")
            overrides = str(rc.get("overrides", "")).split()
            recipe = load_fl_config(str(rc["config"]), overrides)
        run_server(grid, recipe, log)

    return app


server_app = make_server_app()


def concurrent_clients(sim: SimulationConfig) -> int:
    """Clients the Simulation Runtime trains at once: Ray fits num_cpus // client_cpus
    ClientApps (at least one); GPUs may bind first."""
    n = int(sim.num_cpus // sim.client_cpus) if sim.client_cpus > 0 else sim.num_cpus
    if sim.client_gpus > 0:
        gpus = torch.cuda.device_count()
        if gpus:
            n = min(n, int(gpus // sim.client_gpus))
    return max(1, n)


def run_simulation_fl(cfg: FLConfig, log: Callable[[str], Any] = print) -> dict:
    """Run ``cfg`` in Flower's Simulation Runtime (Ray backend) on this machine."""
    import logging
    from pathlib import Path

    from flwr.simulation import run_simulation

    logging.getLogger("flwr").setLevel(logging.INFO)  # a previous run may have left DEBUG on

    out = Path(cfg.out_dir)
    flower_env(out / "flwr_home")
    population = len(speakers_of(manifest_paths(cfg)["train"]))
    warm_feature_cache(cfg)
    sim = cfg.simulation
    results: dict = {}

    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        results.update(run_server(grid, cfg, log, workers=concurrent_clients(sim)))

    run_simulation(server_app=app, client_app=client_app, num_supernodes=population,
                   backend_config={
                       "client_resources": {"num_cpus": sim.client_cpus,
                                            "num_gpus": sim.client_gpus},
                       "init_args": {"num_cpus": sim.num_cpus, "include_dashboard": False}})
    if not results:
        raise RuntimeError(f"the federated run in {out} ended without results (see the log "
                           "above: the ServerApp raised)")
    return results
