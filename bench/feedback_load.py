"""Load benchmark for the feedback server (not a test): the figures of issue 12 ("Speed").

`rlhfkit serve` runs in its own process(es) on a loopback port; labelers are threads, each with
its own API key and HTTP connection, asking for the next item and submitting a ranking. Four parts:

  saturated  --labelers labelers as fast as they can, for each --workers: submissions/s, and the
             server's CPU time per submission (what a shared machine distorts least)
  paced      --paced-labelers labelers at a human pace (one submit every --pace s each, spread
             evenly), for each --workers: p50/p99 of next and of submit
  next       the cost of `/next` as a --fill-items project fills (0%, 50%, 95% complete): median
             over --next-requests next+submit rounds by one labeler
  import     the stall labelers see while an admin imports a --fill-items file: their slowest
             request during the import against their median outside it

After every run with labelers the database is checked: every accepted submission stored exactly
once, no item over its N judgments, each item's counter equal to its judgment rows.

    python bench/feedback_load.py --backends sqlite postgresql --workers 1 2 4
    python bench/feedback_load.py --src /tmp/old/src ...    # the same against another checkout

PostgreSQL: a scratch database is created on --pg and dropped afterwards. The load generator
runs on the same machine as the server, so on a small machine it takes CPU from the server.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
if "--src" in sys.argv:  # another checkout's code, server and all (e.g. the code before a change)
    SRC = str(Path(sys.argv[sys.argv.index("--src") + 1]).resolve())
sys.path.insert(0, SRC)

from sqlalchemy import func, inspect, select, update  # noqa: E402

from rlhfkit.feedback import service  # noqa: E402
from rlhfkit.feedback.client import FeedbackClient, FeedbackError  # noqa: E402
from rlhfkit.feedback.db import Database  # noqa: E402
from rlhfkit.feedback.models import Assignment, Item, Judgment, utcnow  # noqa: E402
from rlhfkit.feedback.schemas import MemberIn, ProjectIn, UserIn  # noqa: E402


def jsonl(items: int, k: int, prefix: str = "p") -> bytes:
    rows = (
        {
            "prompt_id": f"{prefix}{i}",
            "prompt": f"Prompt {i}: explain item {i}.",
            "completions": [f"candidate {j} for prompt {i} " * 8 for j in range(k)],
        }
        for i in range(items)
    )
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def seed(db: Database, labelers: int, items: int, k: int, overlap: int) -> tuple[int, list[str], str]:
    """A project with `items` items and `labelers` labelers; (project id, their API keys, the owner's)."""
    with db.session(write=True) as s:
        project = service.create_project(s, ProjectIn(name="bench", overlap=overlap))
        service.import_items(s, project, service.parse_upload("bench.jsonl", jsonl(items, k), "ranking"))
        owner = service.create_user(s, UserIn(username="owner", is_owner=True))
        keys = []
        for i in range(labelers):
            user = service.create_user(s, UserIn(username=f"labeler{i}"))
            service.set_member(s, project, MemberIn(username=user.username))
            keys.append(service.create_api_key(s, user, "bench"))
        return project.id, keys, service.create_api_key(s, owner, "bench")


@contextmanager
def scratch_db(backend: str, pg: str, workdir: Path) -> Iterator[str]:
    """A fresh, migrated database URL: a SQLite file, or a PostgreSQL database dropped afterwards."""
    if backend == "sqlite":
        url = f"sqlite:///{workdir}/bench.db"
        migrate(url)
        yield url
        return
    admin = psycopg.connect(pg, autocommit=True)
    name = f"rlhfkit_bench_{uuid.uuid4().hex[:10]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
        migrate(url)
        yield url
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def migrate(url: str) -> None:
    db = Database(url)
    db.migrate()
    db.dispose()


def cpu_seconds(pid: int) -> float:
    """CPU time used so far by a process and its children (Linux /proc): the server's own cost,
    which a shared machine does not distort the way it distorts wall-clock throughput."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # from the state field on
        except OSError:
            continue
        if int(stat.parent.name) == pid or int(fields[1]) == pid:
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


@contextmanager
def server(db_url: str, workdir: Path, workers: int) -> Iterator[tuple[str, int]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = [f"db_url={db_url}", f"port={port}", f"secret_key_file={workdir}/secret", "log_level=error"]
    if workers > 1:
        settings.append(f"workers={workers}")
    proc = subprocess.Popen(
        [sys.executable, "-m", "rlhfkit.cli", "serve", *settings],
        env=os.environ | {"PYTHONPATH": SRC},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/login", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")
        time.sleep(0.5 if workers > 1 else 0)  # let every worker come up, not only the first
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


class Load:
    """Labelers working against a server: each records (start, end, kind) of its requests."""

    def __init__(self, url: str, project_id: int, keys: list[str], pace: float | None):
        self.url, self.project_id, self.keys, self.pace = url, project_id, keys, pace
        self.accepted: list[int] = []
        self.calls: list[tuple[float, float, str]] = []
        self.refused: Counter[int] = Counter()
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def labeler(self, n: int, key: str, ready: threading.Barrier) -> None:
        rng = random.Random(n)
        accepted, calls = [], []
        with FeedbackClient(self.url, api_key=key, timeout=120) as client:
            if self.pace:  # drop an idle connection before the server does (uvicorn: after 5 s), as browsers do
                client.http = httpx.Client(
                    base_url=self.url,
                    headers=client.http.headers,
                    timeout=120,
                    limits=httpx.Limits(keepalive_expiry=min(4.0, self.pace / 2)),
                )
            client.me()  # connect before the clock starts
            ready.wait()
            due = time.monotonic() + (self.pace * n / len(self.keys) if self.pace else 0)  # spread evenly
            while not self.stop.is_set():
                if self.pace:
                    if self.stop.wait(max(0.0, due - time.monotonic())):
                        break
                    due += self.pace
                t0 = time.monotonic()
                item = client.next_item(self.project_id)
                t1 = time.monotonic()
                calls.append((t0, t1, "next"))
                if item is None:
                    break
                raw = [rng.randint(1, len(item["candidates"])) for _ in item["candidates"]]
                dense = {r: i + 1 for i, r in enumerate(sorted(set(raw)))}  # ties allowed, no gaps
                ranking = {c["id"]: dense[r] for c, r in zip(item["candidates"], raw, strict=True)}
                t1 = time.monotonic()
                try:
                    accepted.append(client.submit(self.project_id, item["item_id"], ranking)["id"])
                except FeedbackError as e:
                    with self.lock:
                        self.refused[e.status] += 1
                calls.append((t1, time.monotonic(), "submit"))
        with self.lock:
            self.accepted.extend(accepted)
            self.calls.extend(calls)

    @contextmanager
    def running(self) -> Iterator[None]:
        ready = threading.Barrier(len(self.keys) + 1)
        threads = [threading.Thread(target=self.labeler, args=(n, k, ready)) for n, k in enumerate(self.keys)]
        for t in threads:
            t.start()
        ready.wait()
        self.began = time.monotonic()
        try:
            yield
        finally:
            self.stop.set()
            for t in threads:
                t.join()
            self.ended = time.monotonic()

    def ms(self, kind: str, during: tuple[float, float] | None = None) -> np.ndarray:
        lo, hi = during or (-np.inf, np.inf)
        return np.array([(b - a) * 1000 for a, b, k in self.calls if k == kind and b > lo and a < hi])


def pct(values: np.ndarray, q: float) -> float:
    return round(float(np.percentile(values, q)), 1) if len(values) else float("nan")


def check(db: Database, accepted: list[int], overlap: int) -> dict[str, int]:
    """Every accepted judgment stored, none twice, no item over N, counters equal to the rows."""
    with db.session() as s:
        stored = set(s.scalars(select(Judgment.id)))
        pairs = s.execute(select(Judgment.item_id, Judgment.user_id)).all()
        over = s.scalar(select(func.count()).select_from(Item).where(Item.n_judgments > overlap))
        rows_per_item = select(func.count()).where(Judgment.item_id == Item.id).scalar_subquery()
        mismatched = s.scalar(select(func.count()).select_from(Item).where(Item.n_judgments != rows_per_item))
    return {
        "lost": len(set(accepted) - stored),
        "duplicates": len(pairs) - len(set(pairs)),
        "items_over_n": over,
        "count_mismatches": mismatched,
    }


def labelers_run(backend: str, args: argparse.Namespace, workers: int, paced: bool) -> dict[str, Any]:
    labelers = args.paced_labelers if paced else args.labelers
    with tempfile.TemporaryDirectory() as tmp, scratch_db(backend, args.pg, Path(tmp)) as url:
        db = Database(url)
        pid, keys, _ = seed(db, labelers, args.items, args.k, args.overlap)
        with server(url, Path(tmp), workers) as (base, server_pid):
            load = Load(base, pid, keys, args.pace if paced else None)
            with load.running():
                cpu = cpu_seconds(server_pid)
                time.sleep(args.seconds)
                cpu = cpu_seconds(server_pid) - cpu
        result = check(db, load.accepted, args.overlap)
        db.dispose()
    elapsed = load.ended - load.began
    nxt, sub = load.ms("next"), load.ms("submit")
    both = np.concatenate([nxt, sub])
    return {
        "part": "paced" if paced else "saturated",
        "backend": backend,
        "workers": workers,
        "labelers": labelers,
        "seconds": round(elapsed, 1),
        "submissions_per_s": round(len(load.accepted) / elapsed, 1),
        "server_cpu_ms_per_submission": round(cpu * 1000 / max(1, len(load.accepted)), 1),
        "p50_ms": pct(both, 50),
        "p99_ms": pct(both, 99),
        "next_p50_ms": pct(nxt, 50),
        "next_p99_ms": pct(nxt, 99),
        "submit_p50_ms": pct(sub, 50),
        "submit_p99_ms": pct(sub, 99),
        "refused": dict(load.refused),
        **result,
    }


def fill(db: Database, pid: int, fillers: list[int], target: int) -> None:
    """Complete untouched items, in order, until `target` items of the project are complete: each
    gets a judgment (and a done assignment) from every filler, as if they had labeled it."""
    overlap = len(fillers)
    with db.session(write=True) as s:
        complete = s.scalar(select(func.count()).where(Item.project_id == pid, Item.n_judgments >= overlap))
        ids = s.scalars(
            select(Item.id)
            .where(Item.project_id == pid, Item.n_judgments == 0)
            .order_by(Item.position)
            .limit(max(0, target - complete))
        ).all()
        if not ids:
            return
        now = utcnow()
        for user in fillers:
            s.execute(
                Assignment.__table__.insert(),
                [{"item_id": i, "user_id": user, "display_order": [], "leased_until": now, "done": True} for i in ids],
            )
            s.execute(
                Judgment.__table__.insert(),
                [{"item_id": i, "user_id": user, "ranking": [1], "client_token": f"fill-{i}"} for i in ids],
            )
        values: dict[str, Any] = {"n_judgments": overlap}
        if "complete" in {c["name"] for c in inspect(s.connection()).get_columns("items")}:
            values["complete"] = True  # the dispatcher's flag, where the schema has it
        for start in range(0, len(ids), 500):
            s.execute(update(Item.__table__).where(Item.id.in_(ids[start : start + 500])).values(values))


def next_cost(backend: str, args: argparse.Namespace, workers: int) -> list[dict[str, Any]]:
    """One labeler's /next as the project fills; three other labelers did the filling."""
    out = []
    with tempfile.TemporaryDirectory() as tmp, scratch_db(backend, args.pg, Path(tmp)) as url:
        db = Database(url)
        pid, keys, _ = seed(db, 4, args.fill_items, args.k, 3)
        with db.session() as s:
            fillers = [service.get_user(s, f"labeler{i}").id for i in (1, 2, 3)]
        with server(url, Path(tmp), workers) as (base, _), FeedbackClient(base, api_key=keys[0], timeout=120) as client:
            for fraction in (0.0, 0.5, 0.95):
                fill(db, pid, fillers, int(fraction * args.fill_items))
                if backend == "postgresql":
                    with db.engine.connect() as conn:
                        conn.exec_driver_sql("ANALYZE")  # as after an import; autovacuum would, later
                times = []
                for _ in range(args.next_requests):
                    t0 = time.perf_counter()
                    item = client.next_item(pid)
                    times.append((time.perf_counter() - t0) * 1000)
                    client.submit(pid, item["item_id"], {c["id"]: 1 for c in item["candidates"]})
                out.append(
                    {
                        "part": "next",
                        "backend": backend,
                        "items": args.fill_items,
                        "complete_pct": round(fraction * 100),
                        "next_median_ms": round(float(np.median(times)), 1),
                        "next_p90_ms": pct(np.array(times), 90),
                    }
                )
        db.dispose()
    return out


def import_stall(backend: str, args: argparse.Namespace, workers: int) -> dict[str, Any]:
    """Labelers keep working while the owner imports --fill-items items into their project."""
    data = jsonl(args.fill_items, args.k, prefix="big")
    with tempfile.TemporaryDirectory() as tmp, scratch_db(backend, args.pg, Path(tmp)) as url:
        db = Database(url)
        pid, keys, owner = seed(db, args.stall_labelers, args.items, args.k, args.overlap)
        with server(url, Path(tmp), workers) as (base, _), FeedbackClient(base, api_key=owner, timeout=300) as admin:
            load = Load(base, pid, keys, None)
            with load.running():
                time.sleep(2)
                t0 = time.monotonic()
                added = admin.import_jsonl(pid, data, filename="big.jsonl")["added"]
                t1 = time.monotonic()
                time.sleep(2)
        result = check(db, load.accepted, args.overlap)
        db.dispose()
    during = np.concatenate([load.ms("next", (t0, t1)), load.ms("submit", (t0, t1))])
    outside = np.array([(b - a) * 1000 for a, b, _ in load.calls if b < t0 or a > t1])
    return {
        "part": "import",
        "backend": backend,
        "workers": workers,
        "labelers": args.stall_labelers,
        "imported": added,
        "import_s": round(t1 - t0, 2),
        "stall_s": round(float(during.max()) / 1000, 2) if len(during) else float("nan"),
        "requests_during": len(during),
        "median_outside_ms": pct(outside, 50),
        **result,
    }


def show(r: dict[str, Any]) -> str:
    checks = f"lost {r['lost']}, duplicates {r['duplicates']}, over N {r['items_over_n']}" if "lost" in r else ""
    if r["part"] == "saturated":
        return (
            f"saturated {r['backend']:<10} workers {r['workers']}: {r['submissions_per_s']} submissions/s "
            f"({r['labelers']} labelers, {r['seconds']} s, server CPU {r['server_cpu_ms_per_submission']} ms per "
            f"submission), next p50 {r['next_p50_ms']} ms, submit p50 "
            f"{r['submit_p50_ms']} ms, p99 {r['p99_ms']} ms, refused {r['refused']}, {checks}"
        )
    if r["part"] == "paced":
        return (
            f"paced     {r['backend']:<10} workers {r['workers']}: {r['labelers']} labelers, "
            f"{r['submissions_per_s']} submissions/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms (next p99 "
            f"{r['next_p99_ms']}, submit p99 {r['submit_p99_ms']}), refused {r['refused']}, {checks}"
        )
    if r["part"] == "next":
        return (
            f"next      {r['backend']:<10} {r['items']} items, {r['complete_pct']:>2}% complete: "
            f"median {r['next_median_ms']} ms, p90 {r['next_p90_ms']} ms"
        )
    return (
        f"import    {r['backend']:<10} workers {r['workers']}: {r['imported']} items in {r['import_s']} s "
        f"while {r['labelers']} labelers work: longest request {r['stall_s']} s ({r['requests_during']} "
        f"during the import; median outside it {r['median_outside_ms']} ms), {checks}"
    )


def measure(backend: str, args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    """The asked-for parts on one backend, one result at a time."""
    for workers in args.workers:
        for paced in [p == "paced" for p in ("saturated", "paced") if p in args.parts]:
            yield labelers_run(backend, args, workers, paced)
    if "next" in args.parts:
        yield from next_cost(backend, args, 1)
    if "import" in args.parts:
        yield import_stall(backend, args, max(args.workers))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["saturated", "paced", "next", "import"])
    parser.add_argument("--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"])
    parser.add_argument("--workers", nargs="+", type=int, default=[1], help="server processes, one run each")
    parser.add_argument("--labelers", type=int, default=50, help="saturated: labelers as fast as they can")
    parser.add_argument("--paced-labelers", type=int, default=200)
    parser.add_argument("--pace", type=float, default=5.0, help="paced: seconds between one labeler's submits")
    parser.add_argument("--seconds", type=float, default=15, help="length of a saturated or paced run")
    parser.add_argument("--items", type=int, default=4000, help="enough that the labelers never run out")
    parser.add_argument("--fill-items", type=int, default=20000, help="next and import: the project's size")
    parser.add_argument("--next-requests", type=int, default=40, help="next: rounds per fill level")
    parser.add_argument("--stall-labelers", type=int, default=20, help="import: labelers working meanwhile")
    parser.add_argument("--k", type=int, default=4, help="candidates per item")
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test", help="PostgreSQL admin URL")
    parser.add_argument("--src", help="run this checkout's src/ instead (server included)")
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = []
    for backend in args.backends:
        for r in measure(backend, args):
            results.append(r)
            print(show(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    bad = [
        r for r in results if r.get("lost") or r.get("duplicates") or r.get("items_over_n") or r.get("count_mismatches")
    ]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
