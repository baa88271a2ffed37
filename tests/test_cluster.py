"""Sweeps on real multi-node Ray clusters on this machine (issue 12): how many trials run at once on an autoscaling
cluster that starts without workers, a trial's two Train workers on two nodes, and a node lost mid-trial.

Every cluster binds 127.0.0.1 (tests/conftest.py) and keeps its sockets, logs and address file in a folder of its own
(RAY_TMPDIR), so that another Ray on this machine never finds it, and is ended by the ids of its own processes:
Ray's AutoscalingCluster is not used as it is because its start and shutdown run `ray stop --force`, which ends
every Ray on the machine (and its template, fake_multi_node/example.yaml, is missing from the Ray 2.60 wheel). Its
parts are: a head started with an autoscaling config for Ray's fake multi-node provider, whose monitor (the real
autoscaler) starts real raylets on this machine as worker nodes.
"""

import json
import os
import shutil
import socket
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from flatray import sweep, train
from flatray.sweep import graph

@contextmanager
def own_ray_folder(env: dict[str, str] = {}):
    """A cluster's files in a fresh folder (a short path: Ray's socket paths must stay under 108 bytes), and, when it
    is done, an end to every process that still names that folder (the autoscaler's worker nodes have no other
    owner), by pid."""
    import ray

    ray.shutdown()
    folder = tempfile.mkdtemp(prefix="frc", dir="/tmp")
    saved = {k: os.environ.get(k) for k in ("RAY_TMPDIR", *env)}
    os.environ.update({"RAY_TMPDIR": folder, **env})
    try:
        yield folder
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        ours = [p for p in psutil.process_iter(["cmdline"]) if any(folder in a for a in p.info["cmdline"] or [])]
        for proc in ours:
            proc.terminate()
        _, alive = psutil.wait_procs(ours, timeout=10)
        for proc in alive:  # a raylet may ignore SIGTERM once its GCS is gone
            proc.kill()
        psutil.wait_procs(alive, timeout=10)
        shutil.rmtree(folder, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# A head's dashboard on a port of its own: Ray's default, 8265, may be another Ray's, and the head then starts
# without one, silently; Ray Train needs it (its State API removes finished runs' placement groups), and so do the
# tests (they list the Train workers' nodes).
def dashboard() -> dict:
    return {"include_dashboard": True, "dashboard_port": free_port()}


@contextmanager
def two_node_cluster(head: dict, **head_args):
    """ray.cluster_utils.Cluster with its head up (`head`: its custom resources); tests add the second node."""
    from ray.cluster_utils import Cluster

    with own_ray_folder():
        cluster = Cluster()
        try:
            cluster.add_node(resources=head, **dashboard(), **head_args)
            yield cluster
        finally:
            import ray

            ray.shutdown()
            cluster.shutdown()


def run_sweep(text: str, tmp_path: Path, address: str, capsys) -> tuple[Path, dict, str]:
    path = tmp_path / "sweep.yaml"
    path.write_text(text.format(storage=tmp_path))
    loaded = graph.load(path)
    outcomes = sweep.run(loaded, path.read_text(), address=address, status_every_s=3600)
    out = capsys.readouterr().out
    print(out)  # shown with -s, and in the report of a failure
    return tmp_path / loaded.name, outcomes, out


def train_workers(cluster):
    """Every Ray Train worker actor the cluster has had, dead or alive: its node and the resources it asked for."""
    from ray.util.state import list_actors

    return list_actors(cluster.address, filters=[("class_name", "=", "RayTrainWorker")], detail=True, limit=1000)


def asks(actor, resource: str) -> bool:
    """Whether an actor asked for `resource` (in a placement group, Ray names it <resource>_group_<...>)."""
    return any(k == resource or k.startswith(f"{resource}_group_") for k in actor.required_resources or {})


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


# ------------------------------------------------------------------------------------ the limit, without a cluster

ONE_EXPERIMENT = """
name: one
storage: {storage}
defaults: {{model: tiny-bert, task: toy, scaling: {scaling}}}
experiments:
  full: {{kind: finetune, search: {{space: {{train.seed: {{grid: [0, 1, 2, 3]}}}}, algorithm: grid}}}}
"""


def one_experiment(tmp_path, scaling: str = "{num_workers: 2}", extra: str = "") -> Path:
    path = tmp_path / "one.yaml"
    path.write_text(ONE_EXPERIMENT.format(storage=tmp_path, scaling=scaling) + extra)
    return path


@pytest.mark.parametrize("scaling", [
    {"num_workers": 2}, {"num_workers": 1, "use_gpu": True}, {"num_workers": 2, "resources_per_worker": {"CPU": 4}},
    {"num_workers": 2, "use_gpu": True, "resources_per_worker": {"CPU": 2, "trainer": 1, "GPU": 0}},
])
def test_a_trial_is_planned_with_the_bundles_ray_train_asks_for(scaling):
    import ray.train

    from flatray import config
    from flatray.sweep.plan import trial_bundles

    cfg = config.from_dict({"model": "tiny-bert", "task": "toy", "scaling": scaling})
    asked = ray.train.ScalingConfig(**scaling)._resources_per_worker_not_none  # what Ray Train's workers reserve
    assert trial_bundles(cfg) == [{"CPU": 1}] + [asked] * scaling["num_workers"]


def test_an_autoscaling_cluster_counts_at_its_largest():
    """cluster.yaml's node types with the resources `ray up` fills in for their instance types."""
    import yaml

    from flatray.sweep.plan import grown

    config = yaml.safe_load((Path(__file__).parent.parent / "cluster.yaml").read_text())
    types = config["available_node_types"]
    types["gpu_g5"]["resources"], types["gpu_p4d"]["resources"] = {"CPU": 8, "GPU": 1}, {"CPU": 96, "GPU": 8}
    assert grown(config, {"CPU": 8}) == {"CPU": 8 + 8 * 8 + 96, "GPU": 8 * 1 + 1 * 8}
    config["max_workers"] = 4  # at most 4 worker nodes: the p4d and 3 g5 hold the most GPUs
    assert grown(config, {"CPU": 8})["GPU"] == 8 + 3


def test_the_limit_comes_from_the_command_line_the_sweep_file_or_the_cluster(tmp_path):
    from flatray.sweep.plan import concurrency

    at_most = {"CPU": 9.0, "GPU": 2.0}
    sweep_file = graph.load(one_experiment(tmp_path))  # a trial: 1 + 2 x 1 CPU
    assert concurrency(sweep_file, None, at_most, "the cluster") == (3, "as many as fit the cluster: 9 CPU, 2 GPU")
    assert concurrency(sweep_file, 5, at_most, "the cluster") == (5, "--max-concurrent")
    sweep_file = graph.load(one_experiment(tmp_path, extra="max_concurrent: 2\n"))
    assert concurrency(sweep_file, None, at_most, "the cluster") == (2, "the sweep file's max_concurrent")
    assert concurrency(sweep_file, 4, at_most, "the cluster") == (4, "--max-concurrent")
    gpu = graph.load(one_experiment(tmp_path, "{num_workers: 1, use_gpu: true}"))
    assert concurrency(gpu, None, at_most, "the cluster")[0] == 2  # 2 GPUs
    assert concurrency(gpu, None, {"CPU": 9.0}, "the cluster")[0] == 1  # none fits: one at a time, not none


def test_a_dry_run_says_how_many_trials_at_once_and_why(tmp_path, capsys):
    path = one_experiment(tmp_path, extra="max_concurrent: 2\n")
    assert sweep.main([str(path), "--dry-run"]) == 0
    assert "at most 2 trial(s) at once (the sweep file's max_concurrent)" in capsys.readouterr().out
    assert sweep.main([str(path), "--dry-run", "--max-concurrent", "3"]) == 0
    assert "at most 3 trial(s) at once (--max-concurrent)" in capsys.readouterr().out
    path = one_experiment(tmp_path)
    assert sweep.main([str(path), "--dry-run"]) == 0
    assert f"trial(s) at once (as many as fit local Ray on this machine ({os.cpu_count()} cores): " \
           in capsys.readouterr().out
    path.write_text(path.read_text() + "max_concurrent: 0\n")
    assert sweep.main([str(path), "--dry-run"]) == 2
    assert "max_concurrent" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ 1. an autoscaling cluster

GROW = """
name: grow
storage: {storage}
wandb: {{mode: disabled}}
defaults:
  model: tiny-bert
  task: toy
  data: {{max_train_samples: 64, max_eval_samples: 32}}
  train: {{epochs: 2, batch_size: 16}}
  scaling: {{num_workers: 1, resources_per_worker: {{CPU: 1, trainer: 1}}}}
experiments:
  full:
    kind: finetune
    search: {{space: {{train.seed: {{grid: [0, 1, 2]}}}}, algorithm: grid, scheduler: none}}
"""


def resource_request() -> list[dict]:
    """The standing request of ray.autoscaler.sdk.request_resources, where the (v1) autoscaler reads it."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL
    from ray.experimental.internal_kv import _internal_kv_get

    return json.loads(_internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL) or b"[]")


def fake_autoscaling_config(gcs_port: int, head: dict, workers: dict) -> dict:
    """The config AutoscalingCluster writes: Ray's fake multi-node provider, which starts a worker node as a raylet
    on this machine, joined to the head at `gcs_port`."""
    return {
        "cluster_name": "flatray-test", "max_workers": sum(t["max_workers"] for t in workers.values()),
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs_port}"},
        "available_node_types": {"ray.head.default": {"resources": head, "node_config": {}, "max_workers": 0},
                                 **workers},
        "head_node_type": "ray.head.default", "auth": {}, "upscaling_speed": 1.0, "idle_timeout_minutes": 1.0,
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


@pytest.fixture
def autoscaling_cluster():
    """A head with 1 CPU and no `trainer` resource; a worker node type with {CPU: 2, trainer: 1}, min_workers 0,
    max_workers 2. Until the autoscaler adds a node, no trial can train."""
    from ray.cluster_utils import Cluster

    workers = {"trainer_node": {"resources": {"CPU": 2, "trainer": 1, "object_store_memory": 150 * 2**20},
                                "node_config": {}, "min_workers": 0, "max_workers": 2}}
    # The monitor the head starts inherits these: the fake provider refuses to run without RAY_FAKE_CLUSTER.
    with own_ray_folder({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}) as folder:
        port = free_port()
        config = Path(folder) / "autoscaling.json"
        config.write_text(json.dumps(fake_autoscaling_config(port, {"CPU": 1}, workers)))
        cluster = Cluster()
        try:
            cluster.add_node(num_cpus=1, gcs_server_port=port, autoscaling_config=str(config), **dashboard())
            yield cluster, str(config)
        finally:
            import ray

            ray.shutdown()
            cluster.shutdown()


@pytest.mark.slow  # a cluster and real sweeps on it: minutes on two cores
def test_an_autoscaling_cluster_grows_for_the_trials_and_runs_them_at_once(autoscaling_cluster, tmp_path, capsys):
    import ray

    cluster, config = autoscaling_cluster
    train.init_ray(cluster.address, 0, False)
    asked, done = [], threading.Event()

    def sample():  # what the sweep asks the autoscaler for while it runs, each second
        while not done.wait(1):
            asked.append(resource_request())

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.time()
    try:
        root, outcomes, out = run_sweep(GROW, tmp_path, cluster.address, capsys)
    finally:
        done.set()
        sampler.join()

    # The limit came from the autoscaler's config (head 1 CPU + 2 x {2 CPU, 1 trainer}; a trial asks 2 CPU, 1
    # trainer), not from the cluster at the start (1 CPU, no trainer: 1 trial at best).
    assert f"up to 2 trial(s) at once (as many as fit the cluster grown to its node types' max_workers ({config}): " \
           "5 CPU, 2 trainer)" in out
    assert sorted(s["status"] for _, s in outcomes.values()) == ["done"] * 3
    # The whole footprint of the 2 trials it starts with, drivers and Train workers, asked for at once; withdrawn
    # at the end (or the cluster would keep its nodes for ever).
    assert [{"CPU": 1.0}, {"CPU": 1.0, "trainer": 1.0}] * 2 in asked and resource_request() == []

    from ray.util.state import list_nodes

    grown = [n for n in list_nodes(cluster.address, detail=True, limit=100) if n.resources_total.get("trainer")]
    assert len(grown) == 2  # the autoscaler added both worker nodes (and no more: max_workers 2)
    # A worker actor that died before it was placed (its group restarted under load) has no node: left out.
    workers = [w for w in train_workers(cluster) if w.node_id]
    assert {w.node_id for w in workers} <= {n.node_id for n in grown} and len({w.node_id for w in workers}) == 2

    # Two trials at once, never three: their [started, ended] and their Train workers' lifetimes overlap.
    started = {i: json.loads((root / i / "trial.json").read_text())["started"] for i in outcomes}
    spans = [(started[i], summary["ended"]) for i, (_, summary) in outcomes.items()]
    actors = ray._private.state.actors()
    lifetimes = [(a["StartTime"], a["EndTime"]) for a in actors.values()
                 if a["ActorClassName"] == "RayTrainWorker" and a["StartTime"]]  # placed ones (see above)
    assert len(lifetimes) >= 3 and all(end for _, end in lifetimes)
    assert most_at_once(spans) == 2 and most_at_once(lifetimes) == 2
    print(f"[figures] limit 2 from the autoscaler config; nodes added at "
          f"{[round(n.start_time_ms / 1000 - start, 1) for n in grown]} s after the sweep started; "
          f"trials at once: {most_at_once(spans)} (trial spans), {most_at_once(lifetimes)} (Train workers); "
          f"workers on nodes {sorted({w.node_id[-5:] for w in workers})}; sweep {time.time() - start:.0f} s")


# ------------------------------------------------------------------------------------ 2. workers on two nodes

TWO_NODES = """
name: nodes
storage: {storage}
wandb: {{mode: disabled}}
defaults:
  model: tiny-bert
  task: toy
  data: {{max_train_samples: 512, max_eval_samples: 64}}
  train: {{epochs: 3, batch_size: 16, seed: 0}}
  deepspeed: {{zero_stage: 1}}
  scaling: {{num_workers: 2}}
experiments:
  spread:  # one `slot` on each node: one worker per node
    kind: finetune
    config: {{scaling: {{resources_per_worker: {{slot: 1}}}}}}
  packed:  # both `pair`s are on the head: both workers there
    kind: finetune
    config: {{scaling: {{resources_per_worker: {{pair: 1}}}}}}
"""


@pytest.mark.slow  # a cluster and real sweeps on it: minutes on two cores
def test_two_workers_on_two_nodes_train_exactly_as_on_one(tmp_path, capsys):
    """The head has the only CPU (the trial's driver) and offers {slot: 1, pair: 2}; the second node offers
    {slot: 1}. Workers ask no CPU, so the runs differ in where the workers are and nothing else."""
    import torch
    from safetensors.torch import load_file

    with two_node_cluster({"slot": 1, "pair": 2}, num_cpus=1) as cluster:
        cluster.add_node(num_cpus=0, resources={"slot": 1})
        root, outcomes, out = run_sweep(TWO_NODES, tmp_path, cluster.address, capsys)
        workers = train_workers(cluster)
        head_id = cluster.head_node.node_id

    assert "up to 1 trial(s) at once (as many as fit the cluster as it is now (no autoscaler config found)" in out
    summaries = {r["experiment"]: s for r, s in outcomes.values()}
    assert summaries["spread"]["status"] == summaries["packed"]["status"] == "done"
    spread = [w.node_id for w in workers if asks(w, "slot")]
    packed = [w.node_id for w in workers if asks(w, "pair")]
    assert len(spread) == len(packed) == 2, [w.required_resources for w in workers]
    assert len(set(spread)) == 2 and head_id in spread  # one worker on each node
    assert set(packed) == {head_id}

    # Exactly equal, not close: fp32 on CPU, one thread per worker, the same seed, data shards and dropout per rank;
    # the only cross-worker arithmetic is the sum of two workers' gradients, and a + b == b + a in floating point,
    # whichever node adds them.
    def timeless(metrics):
        return {k: v for k, v in metrics.items() if "seconds" not in k}

    assert summaries["spread"]["metrics"]["score"] > 0.6  # they learned (two untrained models are equal too)
    assert timeless(summaries["spread"]["metrics"]) == timeless(summaries["packed"]["metrics"])
    assert [timeless(h) for h in summaries["spread"]["history"]] == [timeless(h) for h in summaries["packed"]["history"]]
    a, b = (load_file(f"{summaries[e]['checkpoint']}/model.safetensors") for e in ("spread", "packed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    print(f"[figures] spread workers on nodes {[n[:8] for n in spread]}, packed on {[n[:8] for n in packed]} "
          f"(head {head_id[:8]}); dev accuracy {summaries['spread']['metrics']['validation/accuracy']} both; "
          f"{len(a)} weight tensors bit-equal")


# ------------------------------------------------------------------------------------ 3. a node lost

NODE_LOSS = """
name: loss
storage: {storage}
wandb: {{mode: disabled}}
defaults:
  model: tiny-bert
  task: toy
  data: {{max_train_samples: 512, max_eval_samples: 64}}
  train: {{epochs: 6, batch_size: 16, seed: 0}}
  scaling: {{num_workers: 2}}
experiments:
  full: {{kind: finetune, retries: 1}}
"""


@pytest.mark.slow  # a cluster and real sweeps on it: minutes on two cores
def test_a_trial_whose_node_is_lost_retries_on_the_other_from_its_checkpoint(tmp_path, capsys):
    """Two nodes of 2 free CPUs each (the head has one more), held so that the trial's driver can only start on the
    head and then its workers only on the second node. After the trial's first checkpoint, the head's CPUs are
    released and the second node is killed (all its processes, raylet first, SIGKILL): the retry can only start its
    workers on the head."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    with two_node_cluster({}, num_cpus=3) as cluster:
        train.init_ray(cluster.address, 0, False)
        head_hold = placement_group([{"CPU": 2}], strategy="STRICT_PACK")  # the only node yet: the head
        ray.get(head_hold.ready(), timeout=60)
        node = cluster.add_node(num_cpus=2)  # here: a node is added from the main thread only
        node_hold = placement_group([{"CPU": 2}], strategy="STRICT_PACK")  # fits there only
        ray.get(node_hold.ready(), timeout=60)
        seen: dict = {}

        def lose_the_node():
            try:
                trial = wait_for(lambda: next(tmp_path.glob("loss/*/trial.json"), None)).parent
                remove_placement_group(node_hold)  # the driver is on the head: now its workers go to the node
                snapshot = trial / "train" / "checkpoint_manager_snapshot.json"
                wait_for(lambda: snapshot.exists() and "checkpoint_" in snapshot.read_text())
                seen["workers"] = [w.node_id for w in train_workers(cluster) if w.state == "ALIVE"]
                remove_placement_group(head_hold)
                cluster.remove_node(node, allow_graceful=False)
                seen["killed"] = time.time()
                # What the retry restores: Ray Train's latest registered checkpoint (a later one may have been
                # written when the node died, and never registered).
                latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["checkpoint_dir_name"]
                seen["history"] = json.loads((trial / "train" / latest / "history.json").read_text())
            except Exception as err:  # reported by the test, which would otherwise only see a sweep that hangs
                seen["error"] = err
                for hold in (node_hold, head_hold):
                    remove_placement_group(hold)

        killer = threading.Thread(target=lose_the_node, daemon=True)
        killer.start()
        root, outcomes, out = run_sweep(NODE_LOSS, tmp_path, cluster.address, capsys)
        killer.join(timeout=60)
        retry_workers = [w.node_id for w in train_workers(cluster) if w.node_id != node.node_id]
        head_id = cluster.head_node.node_id

    assert "error" not in seen, seen.get("error")
    assert seen["workers"] == [node.node_id] * 2  # the trial's workers ran on the node that was lost
    (record, summary), = outcomes.values()
    assert summary["status"] == "done", summary["error"]
    trial = root / record["id"]
    attempts = [json.loads(line) for line in (trial / "attempts.jsonl").read_text().splitlines()]
    assert [a["attempt"] for a in attempts] == [1, 2] and summary["attempts"] == 2
    assert attempts[1]["start"] > seen["killed"]
    assert set(retry_workers) == {head_id} and len(retry_workers) == 2  # the retry ran on the surviving head

    # It continued after its checkpoint: the epochs the checkpoint held are in the final history as they were
    # (epoch_seconds included: not re-run), and the retry reported only later epochs.
    saved = seen["history"]
    assert summary["history"][:len(saved)] == saved
    reported = [json.loads(line) for line in (trial / "result.json").read_text().splitlines()]  # Tune's, in order
    first = [r["epoch"] for r in reported if r["timestamp"] < seen["killed"]]
    retried = [r["epoch"] for r in reported if r["timestamp"] >= seen["killed"]]
    assert first[-1] >= saved[-1]["epoch"] >= 1 and retried == list(range(saved[-1]["epoch"] + 1, 7))
    print(f"[figures] workers on node {node.node_id[:8]} killed after the checkpoint of epoch {saved[-1]['epoch']}; "
          f"attempt 1 reported epochs {first}, attempt 2 (workers on the head {head_id[:8]}) epochs {retried}; "
          f"epochs redone: {len([e for e in retried if e in first])}")


def wait_for(check, timeout: float = 300, every: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every)
    raise TimeoutError(f"waited {timeout} s for {check}")
