"""Load benchmark for the feedback server (not a test).

N concurrent labelers (threads, each with its own API key and HTTP connection) ask for the next
item and submit a ranking, over and over, for a fixed time, against `rlhfkit serve` running in its
own process on a loopback port. Then the database is checked: every accepted submission must be
there exactly once and no item may exceed its N judgments.

    python bench/feedback_load.py --labelers 50 --seconds 20 --backends sqlite postgresql

Reports, per backend: submissions/s, p50/p99 latency of submit and of next, lost (must be 0).
PostgreSQL: a scratch database is created on --pg and dropped afterwards.
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
from pathlib import Path

import httpx
import numpy as np
import psycopg
from sqlalchemy import func, select

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from rlhfkit.feedback import service  # noqa: E402
from rlhfkit.feedback.client import FeedbackClient, FeedbackError  # noqa: E402
from rlhfkit.feedback.db import Database  # noqa: E402
from rlhfkit.feedback.models import Item, Judgment  # noqa: E402
from rlhfkit.feedback.schemas import MemberIn, ProjectIn, UserIn  # noqa: E402


def seed(db: Database, labelers: int, items: int, k: int, overlap: int) -> tuple[int, list[str]]:
    rows = "".join(
        json.dumps(
            {
                "prompt_id": f"p{i}",
                "prompt": f"Prompt {i}: explain item {i}.",
                "completions": [f"candidate {j} for prompt {i} " * 8 for j in range(k)],
            }
        )
        + "\n"
        for i in range(items)
    )
    with db.session(write=True) as s:
        project = service.create_project(s, ProjectIn(name="bench", overlap=overlap))
        service.import_items(s, project, service.parse_upload("bench.jsonl", rows.encode(), "ranking"))
        keys = []
        for i in range(labelers):
            user = service.create_user(s, UserIn(username=f"labeler{i}"))
            service.set_member(s, project, MemberIn(username=user.username))
            keys.append(service.create_api_key(s, user, "bench"))
        return project.id, keys


def start_server(db_url: str, workdir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rlhfkit.cli",
            "serve",
            f"db_url={db_url}",
            f"port={port}",
            f"secret_key_file={workdir}/secret",
            "log_level=error",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/login", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.stderr else ''}")


def run_load(url: str, project_id: int, keys: list[str], seconds: float) -> dict:
    accepted: list[int] = []
    submit_ms: list[float] = []
    next_ms: list[float] = []
    refused = Counter()
    lock = threading.Lock()
    stop_at = 0.0

    def start_clock() -> None:  # runs once, when every labeler is connected and ready
        nonlocal stop_at
        stop_at = time.monotonic() + seconds

    start = threading.Barrier(len(keys) + 1, action=start_clock)

    def labeler(n: int, key: str) -> None:
        rng = random.Random(n)
        mine_ok, mine_submit, mine_next = [], [], []
        with FeedbackClient(url, api_key=key, timeout=60) as client:
            client.me()  # open the connection before the clock starts
            start.wait()
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                item = client.next_item(project_id)
                t1 = time.perf_counter()
                mine_next.append((t1 - t0) * 1000)
                if item is None:
                    break
                raw = [rng.randint(1, len(item["candidates"])) for _ in item["candidates"]]
                dense = {r: i + 1 for i, r in enumerate(sorted(set(raw)))}  # ties allowed, no gaps
                ranking = {c["id"]: dense[r] for c, r in zip(item["candidates"], raw, strict=True)}
                t1 = time.perf_counter()
                try:
                    out = client.submit(project_id, item["item_id"], ranking)
                    mine_ok.append(out["id"])
                except FeedbackError as e:
                    with lock:
                        refused[e.status] += 1
                mine_submit.append((time.perf_counter() - t1) * 1000)
        with lock:
            accepted.extend(mine_ok)
            submit_ms.extend(mine_submit)
            next_ms.extend(mine_next)

    threads = [threading.Thread(target=labeler, args=(n, key)) for n, key in enumerate(keys)]
    for t in threads:
        t.start()
    start.wait()
    began = time.monotonic()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - began
    return {
        "accepted": accepted,
        "submit_ms": submit_ms,
        "next_ms": next_ms,
        "refused": dict(refused),
        "elapsed": elapsed,
    }


def check(db: Database, accepted: list[int], overlap: int) -> dict:
    """Every accepted judgment stored, none twice, no item over N, counters equal to the rows."""
    with db.session() as s:
        stored = set(s.scalars(select(Judgment.id)))
        duplicates = s.scalar(
            select(func.count()).select_from(
                select(Judgment.item_id)
                .group_by(Judgment.item_id, Judgment.user_id)
                .having(func.count() > 1)
                .subquery()
            )
        )
        over = s.scalar(select(func.count()).select_from(Item).where(Item.n_judgments > overlap))
        rows_per_item = select(func.count()).where(Judgment.item_id == Item.id).scalar_subquery()
        mismatched = s.scalar(select(func.count()).select_from(Item).where(Item.n_judgments != rows_per_item))
    return {
        "lost": len(set(accepted) - stored),
        "duplicates": duplicates,
        "items_over_n": over,
        "count_mismatches": mismatched,
        "stored": len(stored),
    }


def bench_backend(backend: str, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        admin, dbname = None, None
        if backend == "sqlite":
            db_url = f"sqlite:///{workdir}/bench.db"
        else:
            admin = psycopg.connect(args.pg, autocommit=True)
            dbname = f"rlhfkit_bench_{uuid.uuid4().hex[:10]}"
            admin.execute(f'CREATE DATABASE "{dbname}"')
            db_url = (
                args.pg.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{dbname}"
            )
        try:
            db = Database(db_url)
            db.migrate()
            project_id, keys = seed(db, args.labelers, args.items, args.k, args.overlap)
            proc, url = start_server(db_url, workdir)
            try:
                load = run_load(url, project_id, keys, args.seconds)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
            result = check(db, load["accepted"], args.overlap)
            db.dispose()
        finally:
            if admin is not None:
                admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
                admin.close()
    sub, nxt = np.array(load["submit_ms"]), np.array(load["next_ms"])
    return {
        "backend": backend,
        "labelers": args.labelers,
        "seconds": round(load["elapsed"], 1),
        "accepted": len(load["accepted"]),
        "submissions_per_s": round(len(load["accepted"]) / load["elapsed"], 1),
        "submit_p50_ms": round(float(np.percentile(sub, 50)), 1),
        "submit_p99_ms": round(float(np.percentile(sub, 99)), 1),
        "next_p50_ms": round(float(np.percentile(nxt, 50)), 1),
        "next_p99_ms": round(float(np.percentile(nxt, 99)), 1),
        "refused": load["refused"],
        **result,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--labelers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--items", type=int, default=3000, help="enough that the labelers never run out")
    parser.add_argument("--k", type=int, default=4, help="candidates per item")
    parser.add_argument("--overlap", type=int, default=3)
    parser.add_argument(
        "--backends", nargs="+", default=["sqlite", "postgresql"], choices=["sqlite", "postgresql"]
    )
    parser.add_argument(
        "--pg", default="postgresql://postgres@127.0.0.1:5432/test", help="PostgreSQL admin URL"
    )
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    results = []
    for backend in args.backends:
        r = bench_backend(backend, args)
        results.append(r)
        print(
            f"{r['backend']:<10} {r['labelers']} labelers, {r['seconds']} s: "
            f"{r['submissions_per_s']} submissions/s ({r['accepted']} accepted), "
            f"submit p50 {r['submit_p50_ms']} ms p99 {r['submit_p99_ms']} ms, "
            f"next p50 {r['next_p50_ms']} ms p99 {r['next_p99_ms']} ms, refused {r['refused']}, "
            f"lost {r['lost']}, duplicates {r['duplicates']}, items over N {r['items_over_n']}",
            flush=True,
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    bad = [r for r in results if r["lost"] or r["duplicates"] or r["items_over_n"] or r["count_mismatches"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
