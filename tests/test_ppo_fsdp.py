"""PPO under FSDP2 (`configs/accelerate/fsdp.yaml`) on two CPU processes over gloo does what DDP
does: the same responses and the same metrics to float tolerance, and a run killed with SIGKILL
resumes from its sharded checkpoint to the uninterrupted run's numbers.

Why these hold: the processes step the sharded decoder in lock step while sampling (a process
whose responses have all ended forwards dummy tokens until every process's have, `sample`'s
`all_done`), cut as many micro-batches each (`Rollout.lockstep`), and the reference and reward
models are whole replicas in each process, as under DDP. The runs are `test_ppo_ddp.py`'s.
"""

from __future__ import annotations

import json
import signal
import time

import pytest

from rlhfkit.engine.metrics import read_metrics
from test_ppo_ddp import assert_same_rows, files, responses, write_config  # noqa: F401  (files: the fixture)
from testutil import accelerate_launch, finish, kill_tree


@pytest.mark.slow
def test_fsdp_ppo_matches_ddp_killed_and_resumed(files):  # noqa: F811
    root, model, prompts = files
    sections = {"sampling": {"max_new_tokens": 8, "temperature": 1.0, "batch_size": 8}}
    ddp = write_config(root, "ddp", model, prompts, **sections)
    finish(accelerate_launch(["ppo", "--config", str(ddp)], path=root))

    cfg = write_config(root, "fsdp", model, prompts, **sections)
    child = accelerate_launch(["ppo", "--config", str(cfg)], config="fsdp.yaml", path=root, PPO_TEST_SLOW="0.5")
    ckpts = root / "fsdp" / "checkpoints"
    deadline = time.monotonic() + 180
    while not list(ckpts.glob("step-*")) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    kill_tree(child)
    out, _ = child.communicate()
    assert child.returncode == -signal.SIGKILL, out.decode()[-4000:]
    assert not (root / "fsdp" / "results.json").exists()
    printed = finish(accelerate_launch(["ppo", "--config", str(cfg), "--resume"], config="fsdp.yaml", path=root))
    assert "resumed from" in printed

    one, two = (read_metrics(root / run / "metrics.jsonl") for run in ("ddp", "fsdp"))
    assert [r["step"] for r in two] == [1, 2, 3]
    assert_same_rows(one, two)
    assert responses(root / "fsdp") == responses(root / "ddp")
    assert json.loads((root / "fsdp" / "results.json").read_text())["steps"] == 3
