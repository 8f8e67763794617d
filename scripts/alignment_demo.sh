#!/usr/bin/env bash
# The alignment stages on the demo's pretrained model, each through its CLI (one MLflow run each),
# then the base -> SFT -> PPO / DPO table from the stages' metrics.json files.
#   bash scripts/alignment_demo.sh            # pretrains first if data/pretrain is missing
# PPO writes data/rlhf (configs/rlhf.yaml), DPO the same stage with algorithm=dpo into data/rlhf_dpo.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
# one thread per process: on a shared 2-core machine two threads per process ran 2-4x slower
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

[ -f data/pretrain/model.safetensors ] || "$PY" -m flows.llm --no-push

stage() {  # stage <name> <module> [key=value ...]: run it, print its wall time
  local name=$1 module=$2 t0
  shift 2
  t0=$(date +%s)
  "$PY" -m "$module" "$@"
  echo "$name $(( $(date +%s) - t0 ))" >> "$TIMES"
}
TIMES=$(mktemp)
stage chat_data tasks.chat_data
stage sft tasks.sft
stage reward tasks.reward
stage ppo tasks.rlhf algorithm=ppo out_dir=data/rlhf
stage dpo tasks.rlhf algorithm=dpo out_dir=data/rlhf_dpo

"$PY" - "$TIMES" <<'EOF'
import json, sys
from pathlib import Path

seconds = dict(line.split() for line in Path(sys.argv[1]).read_text().splitlines())
sft = json.loads(Path("data/sft/metrics.json").read_text())
rm = json.loads(Path("data/reward/metrics.json").read_text())
ppo = json.loads(Path("data/rlhf/metrics.json").read_text())
dpo = json.loads(Path("data/rlhf_dpo/metrics.json").read_text())
tasks = ("add", "reverse", "count", "copy")
pct = lambda x: f"{100 * x:.1f}%"
print(f"\nHeld-out verifiable prompts: {ppo['held_out_prompts']} (greedy replies, exact match). "
      f"Reward model: held-out pairwise accuracy {pct(rm['pairwise_accuracy'])} "
      f"(before training {pct(rm['init_pairwise_accuracy'])}, chance 50%; "
      + ", ".join(f"{r} {pct(rm['pairwise_accuracy.' + r])}" for r in ("wrong_answer", "off_topic", "truncated"))
      + f"), {seconds['reward']} s.\n")
print("| model | task accuracy | " + " | ".join(tasks) + " | win rate vs SFT (ground truth) | W/L/T "
      "| win rate vs SFT (reward model) | reward, greedy | reward, sampled | KL to SFT | wall time |")
print("|---" * (11 + len(tasks) - 1) + "|")
print(f"| base (pretrained) | {pct(sft['base_task_accuracy'])} | "
      + " | ".join(pct(sft[f'base_task_accuracy.{t}']) for t in tasks) + " | | | | | | | |")
print(f"| SFT | {pct(ppo['sft_task_accuracy'])} | " + " | ".join(pct(ppo[f'sft_task_accuracy.{t}']) for t in tasks)
      + f" | | | | {ppo['sft_mean_reward']:.2f} | {ppo['sft_sampled_reward']:.2f} | 0 | {seconds['sft']} s |")
for name, m in (("PPO", ppo), ("DPO", dpo)):
    print(f"| {name} | {pct(m['policy_task_accuracy'])} | "
          + " | ".join(pct(m[f'policy_task_accuracy.{t}']) for t in tasks)
          + f" | {pct(m['win_rate'])} | {m['wins']}/{m['losses']}/{m['ties']} | {pct(m['rm_win_rate'])}"
          + f" | {m['policy_mean_reward']:.2f} | {m['policy_sampled_reward']:.2f} | {m['kl_to_reference']:.3f}"
          + f" | {seconds[name.lower()]} s |")
EOF
rm -f "$TIMES"
