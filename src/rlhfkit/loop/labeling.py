"""The loop's side of the labeling server: connect, send a round's candidates as a batch once,
wait for its labels, and bring them back as files.

Why over HTTP with an API key, even for the embedded server: the loop then works the same against
a real server on PostgreSQL that people label on, and the embedded one (SQLite, started in this
process when no `server.url` is given) exercises the same code.

Exactly once: the import is recorded in the round folder (`labels/imported.json`, written
atomically after the server answered); when that record is missing (killed between the two), the
server is asked first: a batch that already has items is not imported again, so labels collected
before a crash are kept and nothing is duplicated.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import Field

from rlhfkit.config import StrictModel, atomic_write_text
from rlhfkit.data.formats import read_records, write_jsonl
from rlhfkit.errors import UserError
from rlhfkit.feedback.client import FeedbackClient, FeedbackError
from rlhfkit.models.device import Device


class ServerConfig(StrictModel):
    url: str = Field("", description="labeling server, e.g. http://host:8000; empty = start an embedded one (SQLite)")
    api_key: str = Field("", description="the project owner's API key (`rlhfkit serve api-key`) or $RLHFKIT_API_KEY")
    project: int = Field(0, ge=0, description="project id on that server (each round is a batch of it)")
    panel_password: str = Field("", description="labelers: simulated on an external server: the panel's password")
    overlap: int = Field(5, ge=1, description="embedded server: labelers per item (5 = the whole simulated panel)")


class LabelsConfig(StrictModel):
    labelers: Literal["simulated", "human"] = Field("simulated", description="simulated panel (tests) or people")
    timeout_s: float = Field(24 * 3600, gt=0, description="stop waiting for a batch after this long (a re-run resumes)")
    poll_s: float = Field(10.0, gt=0, description="seconds between progress checks while waiting")


@dataclass
class Labeling:
    """A connection to the project that labels the rounds."""

    client: FeedbackClient
    url: str
    project: int
    panel_password: str

    def progress(self, batch: str) -> dict[str, Any]:
        return self._call(lambda: self.client.progress(self.project, batch=batch))

    def _call(self, fn: Callable[[], Any]) -> Any:
        """One request; an unreachable server or a refusal is a one-line UserError naming the server."""
        try:
            return fn()
        except httpx.TransportError as e:
            problem = f"cannot reach {self.url} ({type(e).__name__})"
            raise UserError(f"server.url: {problem}; start the server or fix server.url, then re-run") from None
        except FeedbackError as e:
            if e.status in (401, 403):
                problem = f"{self.url} refused it ({e.status}: {e.message})"
                raise UserError(f"server.api_key: {problem}; give the project owner's key") from None
            if e.status == 404:
                raise UserError(f"server.project: {self.url} has no project {self.project} ({e.message})") from None
            raise UserError(f"{self.url}: {e}") from None

    def import_once(self, batch: str, completions: Path, marker: Path) -> None:
        """Send the round's candidates as `batch`, unless the marker or the server says it was done."""
        if marker.exists():
            return
        ours = [r.prompt_id for r in read_records(completions, "completions")]
        batches = self._call(lambda: self.client.progress(self.project))["batches"]
        if any(row["batch"] == batch and row["items"] for row in batches):
            theirs = [r["prompt_id"] for r in self.export(batch, "completions")]
            if sorted(theirs) != sorted(ours):
                raise UserError(
                    f"server.project: batch {batch!r} of project {self.project} holds other prompts than "
                    f"{completions} (another run's?); give this run a project of its own"
                )
            print(f"[loop] batch {batch} is already on the server: not importing it again")
        else:
            counts = self._call(lambda: self.client.import_jsonl(self.project, completions, batch=batch))
            print(f"[loop] imported batch {batch}: {counts}")
        atomic_write_text(marker, json.dumps({"batch": batch, "prompts": len(ours)}) + "\n")

    def export(self, batch: str, kind: str) -> list[dict[str, Any]]:
        return self._call(lambda: self.client.export(self.project, kind, batch=batch))

    def wait(self, batch: str, cfg: LabelsConfig, label: Callable[[], None] | None) -> dict[str, Any]:
        """Until every item of `batch` has its judgments (a progress bar meanwhile); `label` (the
        simulated panel) labels first. Past `cfg.timeout_s`: a UserError that says how far it got."""
        from rlhfkit.engine.progress import Progress

        if label is not None:
            label()
        p = self.progress(batch)
        t0 = time.monotonic()
        with Progress(p["items_total"], f"labels {batch}", initial=p["items_complete"]) as bar:
            while p["items_complete"] < p["items_total"]:
                if time.monotonic() - t0 > cfg.timeout_s:
                    raise UserError(
                        f"labels: batch {batch} has {p['items_complete']} of {p['items_total']} items labeled "
                        f"after labels.timeout_s={cfg.timeout_s:g}s; label the rest on {self.url} and re-run "
                        "(it resumes), or raise labels.timeout_s"
                    )
                time.sleep(cfg.poll_s)
                done = p["items_complete"]
                p = self.progress(batch)
                bar.update(p["items_complete"] - done)
        return p

    def fetch(self, batch: str, folder: Path) -> tuple[Path, Path]:
        """The batch's raw judgments and its items as files (`rlhfkit aggregate`'s inputs); the
        completions file is written last, so its presence means both are whole. Judgments are
        sorted by (item, labeler), not kept in the order they came in: the same labels give the
        same file, and so the same consensus to the last bit, however the labeling was interrupted."""
        rows = sorted(self.export(batch, "judgments"), key=lambda r: (r["prompt_id"], r["labeler"]))
        judgments = write_jsonl(folder / "judgments.jsonl", rows)
        completions = write_jsonl(folder / "completions.jsonl", self.export(batch, "completions"))
        return judgments, completions


@contextmanager
def connect(cfg: ServerConfig, folder: Path) -> Iterator[Labeling]:
    """The configured server, or an embedded one whose database and project live in `folder`
    (kept across runs, so a re-run finds the labels of the last one)."""
    import os

    if cfg.url:
        key = cfg.api_key or os.environ.get("RLHFKIT_API_KEY", "")
        if not key:
            raise UserError("server.api_key: no API key for " + cfg.url + "; set server.api_key or $RLHFKIT_API_KEY")
        if not cfg.project:
            raise UserError(f"server.project: which project on {cfg.url} labels the rounds? set server.project=ID")
        with FeedbackClient(cfg.url, api_key=key) as client:
            lab = Labeling(client, cfg.url.rstrip("/"), cfg.project, cfg.panel_password)
            lab._call(lambda: client.project(cfg.project))  # fail now on a bad url, key or project
            yield lab
        return
    with _embedded(cfg, folder) as lab:
        yield lab


def save_embedded(folder: Path, owner: FeedbackClient, password: str, project: int) -> dict[str, Any]:
    """Record an embedded server's project in `folder/server.json` (owner-only), with a new API key
    of its owner: what `connect` needs to reopen it (`rlhfkit demo`'s later rounds label on the
    server of its first). Written last, so its presence means the project is set up."""
    info = {"password": password, "project": project, "api_key": owner.create_api_key("rlhfkit loop")}
    state = folder / "server.json"
    atomic_write_text(state, json.dumps(info, indent=2) + "\n")
    state.chmod(0o600)
    return info


@contextmanager
def _embedded(cfg: ServerConfig, folder: Path) -> Iterator[Labeling]:
    from rlhfkit.feedback.db import Database
    from rlhfkit.sim.embedded import OWNER, live_server, new_database, panel_project
    from rlhfkit.sim.panel import default_panel

    state = folder / "server.json"
    if state.exists():
        info = json.loads(state.read_text())
        db = Database(f"sqlite:///{folder / 'feedback.db'}")
    else:  # new, or killed while setting up (nothing labeled yet): start over
        (folder / "feedback.db").unlink(missing_ok=True)
        db, _, password = new_database(folder)
        info = {"password": password}
    try:
        with live_server(folder, db) as server:
            print(f"[loop] embedded labeling server on {server.url} (database {folder / 'feedback.db'})")
            with FeedbackClient.login(server.url, OWNER, info["password"]) as owner:
                if "project" not in info:
                    project = panel_project(owner, "loop", cfg.overlap, default_panel(), info["password"])["id"]
                    info = save_embedded(folder, owner, info["password"], project)
            with FeedbackClient(server.url, api_key=info["api_key"]) as client:
                yield Labeling(client, server.url, info["project"], info["password"])
    finally:
        db.dispose()


def simulated_labeling(lab: Labeling, completions: Path, seed: int, device: Device = "auto") -> Callable[[], None]:
    """The simulated panel ranking whatever the server hands out (this round's batch), over HTTP."""
    from rlhfkit.sim.panel import default_panel, gold_utility, label_over_http

    def label() -> None:
        if not lab.panel_password:
            raise UserError("server.panel_password: simulated labelers on an external server need their password")
        utility = gold_utility(read_records(completions, "completions"), device)
        panel, password = default_panel(), lab.panel_password
        counts = lab._call(lambda: label_over_http(lab.url, lab.project, panel, password, utility, seed))
        print(f"[loop] simulated panel: {sum(counts.values())} judgments {counts}")

    return label
