#!/bin/bash
# Does round 2's gain come from the new labels, or only from 20 more PPO steps?
# The control: the round-1 policy of a finished `rlhfkit demo` (rounds=2) run folder trained 20 more
# PPO steps exactly as round 2 was (its config), but against the round-1 reward model (no new labels);
# then round 2 is evaluated against the control on the demo's held-out prompts (gold judges, CIs).
#
#   OMP_NUM_THREADS=1 rlhfkit demo output_dir=runs/demo-s1 seed=1
#   bench/rounds_control.sh runs/demo-s1        # -> runs/demo-s1/control/eval/results.json
set -euo pipefail
d=$(realpath "$1")
rlhfkit=${RLHFKIT:-rlhfkit}
test -f "$d/round-2/ppo/config.yaml" || { echo "$d: no round-2/ppo/config.yaml; run the demo with rounds=2 first" >&2; exit 1; }
sed -e "s|^output_dir: .*|output_dir: $d/control/ppo|" -e "s|$d/round-2/rm/model|$d/rm/model|" \
    "$d/round-2/ppo/config.yaml" > "$d/control-ppo.yaml"
grep -q "$d/rm/model" "$d/control-ppo.yaml"
"$rlhfkit" ppo --config "$d/control-ppo.yaml"
python3 - "$d" <<'PY'
import re
import sys

d = sys.argv[1]
s = open(f"{d}/round-2/eval/config.yaml").read()
s = s.replace(f"output_dir: {d}/round-2/eval", f"output_dir: {d}/control/eval")
s = re.sub(r"models:\n(  .*\n)+", f"models:\n  control: {d}/control/ppo/model\n  round-2: {d}/round-2/ppo/model\n", s)
s = s.replace("baselines:\n- ppo", "baselines:\n- control")
open(f"{d}/control-eval.yaml", "w").write(s)
PY
"$rlhfkit" eval --config "$d/control-eval.yaml"
