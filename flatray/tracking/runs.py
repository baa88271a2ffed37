"""W&B mode, run ids and the artifacts of a trial: what the live callback and the report share.

No W&B import at module level (`wandb` is imported where an artifact is built): the report and `sync` import this
module on machines where importing wandb is slow or W&B is off.

Lineage in offline mode. `Run.use_artifact` refuses to run offline (TypeError), and an artifact cannot be looked
up by name without the server. What `use_artifact(draft_artifact)` does online is log the draft as a *user-created*
artifact with `use_after_commit`; that works offline too: it writes an ArtifactRecord (user_created,
use_after_commit) to the run's .wandb file. On `wandb sync`, wandb-core's ArtifactSaver sends createArtifact
without the run as creator (user_created) and with digest deduplication, so when the parent's artifact with the
same name and content (same digest) is already on the server it gets that version back, and then calls useArtifact
for the child's run: parent run -> artifact version -> child run. The child therefore rebuilds the parent's
artifact exactly as the parent built it (same name, type and entries: `output_artifact` from the parent's
summary.json). Parents must be synced before children: see flatray.tracking.offline.sync.
"""

from __future__ import annotations

import ipaddress
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Mapping

from flatray import methods
from flatray.methods import ARTIFACT_TYPES

MODES = ("online", "offline", "disabled")
# Bounds on what a sweep (Tune's loop) or the report waits for an online W&B: opening a run, and uploading the rest
# at its end (what did not go up stays in the run's folder: `wandb sync --include-online FOLDER`).
INIT_TIMEOUT_S = 20
FINISH_TIMEOUT_S = 60
_TRUE = ("1", "true", "yes")


def _asked(settings: Any) -> tuple[str, bool]:
    """The mode asked for, without looking at the network, and whether it was asked explicitly (not auto)."""
    if settings is None:
        return "disabled", True
    mode = (settings.get("mode") if isinstance(settings, Mapping) else getattr(settings, "mode", None)) or "auto"
    env = os.environ.get("WANDB_MODE", "").strip().lower()
    env = {"dryrun": "offline", "run": "online"}.get(env, env)
    if "disabled" in (mode, env) or os.environ.get("WANDB_DISABLED", "").strip().lower() in _TRUE:
        return "disabled", True
    if env in MODES:
        return env, True
    if mode != "auto":
        return mode, True
    return ("online" if os.environ.get("WANDB_API_KEY") else "offline"), False


def wandb_mode(settings: Any) -> str:
    """online | offline | disabled, for a WandbSettings, a dict like it, or None (W&B off).

    Off when settings are None, their mode is disabled, WANDB_MODE=disabled or WANDB_DISABLED is set; else
    WANDB_MODE wins, then an explicit online/offline; auto is online only with an API key and W&B answering."""
    mode, explicit = _asked(settings)
    if mode == "online" and not explicit and not reachable(base_url()):
        return "offline"  # no route out (cluster nodes often have none): log offline, sync later
    return mode


def run_mode(settings: Any, wandb_dir: str) -> str:
    """The mode W&B runs are opened in: wandb_mode, but offline whenever W&B does not answer, even when online was
    asked for (each online wandb.init would wait out its timeout and then log nothing); said once per folder."""
    mode, _ = _asked(settings)
    if mode != "online":
        return mode
    url = base_url()
    if reachable(url):
        return "online"
    offline_notice(url, wandb_dir)
    return "offline"


def base_url() -> str:
    """The W&B server, found as wandb finds it: WANDB_BASE_URL, else `wandb login --host`'s settings file, else
    W&B's default."""
    import wandb

    settings = wandb.Settings()
    settings.update_from_system_settings()
    settings.update_from_env_vars(dict(os.environ))
    return settings.base_url


_reachable: dict[str, bool] = {}  # one check per server and process: a sweep asks several times at its start


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether a server answers HTTP at url within timeout s (any status counts: a server is there)."""
    if url not in _reachable:
        host = urllib.parse.urlparse(url).hostname or ""
        # As wandb-core (Go's net/http) does: no proxy for the loopback address.
        opener = urllib.request.build_opener(*([urllib.request.ProxyHandler({})] if _loopback(host) else []))
        try:
            opener.open(f"{url.rstrip('/')}/healthz", timeout=timeout).close()
            _reachable[url] = True
        except urllib.error.HTTPError:
            _reachable[url] = True
        except (OSError, ValueError):  # refused, no route, no name, timed out, or not a URL
            _reachable[url] = False
    return _reachable[url]


def _loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_noticed: set[str] = set()


def offline_notice(url: str, wandb_dir: str, why: str = "") -> None:
    """The one console line that says W&B is not reached and where the runs go instead (once per folder)."""
    key = wandb_dir if "://" in wandb_dir else os.path.abspath(wandb_dir)
    if key in _noticed:
        return
    _noticed.add(key)
    print(f"[flatray] W&B unreachable at {url}{f' ({why})' if why else ''}: logging offline to {wandb_dir}; "
          f"upload later with python -m flatray.tracking sync {wandb_dir}", flush=True)


def run_id(sweep: str, trial_id: str) -> str:
    """The trial's W&B run id: stable across re-runs (resume), only characters W&B allows in ids, at most 64."""
    clean = lambda s: re.sub(r"[^A-Za-z0-9_.-]", "-", s)  # noqa: E731
    trial_id = clean(trial_id)[:64]
    return f"{clean(sweep)[:63 - len(trial_id)]}-{trial_id}".lstrip("-")


def artifact_name(summary: dict, what: str) -> str:
    """Deterministic, so that a child names the very artifact its parent logged. The kind as the sweep file wrote
    it, not the method an alias resolves to: names of runs already on W&B do not change."""
    return f'{summary["kind"]}-{summary["id"]}-{ARTIFACT_TYPES[what]}'


def outputs(summary: dict) -> list[str]:
    """The outputs a trial left (per its summary.json) that W&B tracks as artifacts."""
    return [what for what, path in (summary.get("outputs") or {}).items() if path and what in ARTIFACT_TYPES]


def consumed(kind: str, parent_summary: dict) -> list[str]:
    """The parent's outputs a child of this kind takes, i.e. its W&B inputs: the method's needs that the parent
    left. A kind the registry does not know declares none (tracking never fails a trial)."""
    try:
        needs = methods.get(kind).inputs
    except KeyError:
        return []
    return sorted(set(needs) & set(outputs(parent_summary)))


def output_artifact(summary: dict, what: str):
    """One output of a trial as a draft artifact, built the same way by the trial and by each of its children."""
    import wandb

    path = summary["outputs"][what]
    art = wandb.Artifact(artifact_name(summary, what), type=ARTIFACT_TYPES[what])
    if "://" in path:
        # s3:// gs://: the very entry add_reference(path, checksum=False) makes (W&B stores the URI only), built by
        # hand because add_reference first opens a boto3 / google-cloud-storage client, absent on the driver.
        from wandb.sdk.artifacts.artifact_manifest_entry import ArtifactManifestEntry

        name = path.rstrip("/").rsplit("/", 1)[-1]
        art.manifest.add_entry(ArtifactManifestEntry(path=name, ref=path, digest=path))
    elif what == "model":
        # A reference to the checkpoint folder: multi-GB checkpoints are neither copied nor hashed (hashing them
        # would stall Tune's loop); the digest then depends on the file paths, enough since a trial's folder is
        # named by the hash of what determines it (its id).
        art.add_reference(Path(path).resolve().as_uri(), checksum=False)
    else:
        # immutable: uploaded at sync time from where it is, not copied into W&B's staging folder first.
        art.add_file(str(Path(path).resolve()), policy="immutable")
    return art


def declare_input(run, summary: dict, what: str) -> None:
    """The parent's output `what` as an input of `run` (see the module docstring)."""
    # = run.use_artifact(draft) minus its offline guard (TypeError) and its blocking wait(): no public call logs a
    # draft as used offline.
    run._log_artifact(output_artifact(summary, what), is_user_created=True, use_after_commit=True)
