#!/usr/bin/env bash
# The alignment comparison: base -> SFT -> PPO and DPO on the same held-out prompts, with controls.
#   bash scripts/alignment_demo.sh     # runs the pipeline first if data/rlhf is missing
# The pipeline's rlhf stage trains PPO as configs/rlhf.yaml sets it (data/rlhf, the registered
# model). This script then trains, from the same SFT and reward models and through the stage's CLI
# (each its own MLflow run, into data/rlhf_<name>, not DVC outputs; delete one to redo it):
#   ppo_plain    PPO without the SFT term (ptx_coef=0): what the reward model alone does
#   ppo_control  the SFT term alone on PPO's batches and schedule (rl_coef=0)
#   dpo          DPO (RPO: with the chosen reply's NLL) at its own settings, DPO_ARGS
#   dpo_control  the NLL term alone on DPO's batches (rl_coef=0)
# and prints the table the README shows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
DPO_ARGS="algorithm=dpo max_steps=100 lr=0.00005"

[ -f data/rlhf/metrics.json ] || "$PY" -m flows.llm --no-push
algo=$("$PY" -c "import json; print(json.load(open('data/rlhf/metrics.json'))['algorithm'])")
[ "$algo" = ppo ] || { echo "alignment_demo: data/rlhf holds $algo; the comparison expects configs/rlhf.yaml algorithm: ppo" >&2; exit 1; }
run() {  # name, overrides...
  local name=$1; shift
  [ -f "data/rlhf_$name/metrics.json" ] || "$PY" -m tasks.rlhf "$@" out_dir="data/rlhf_$name"
}
run ppo_plain algorithm=ppo ptx_coef=0
run ppo_control algorithm=ppo rl_coef=0
run dpo $DPO_ARGS
run dpo_control $DPO_ARGS rl_coef=0

"$PY" - <<'PYEOF'
import json
from pathlib import Path

read = lambda p: json.loads(Path(p).read_text())
sft, rm = read("data/sft/metrics.json"), read("data/reward/metrics.json")
rows = [("PPO (with ptx; the registered model)", "data/rlhf"), ("PPO without ptx", "data/rlhf_ppo_plain"),
        ("control: PPO's SFT term alone", "data/rlhf_ppo_control"), ("DPO (RPO)", "data/rlhf_dpo"),
        ("control: DPO's NLL term alone", "data/rlhf_dpo_control")]
rl = {name: read(f"{d}/metrics.json") for name, d in rows}
tasks = ("add", "reverse", "count", "copy")
pct = lambda x: f"{100 * x:.1f}%"
ref = rl[rows[0][0]]
print(f"\nHeld-out verifiable prompts: {ref['held_out_prompts']} ({', '.join(tasks)}); greedy replies and "
      f"{ref['sampled_wins'] + ref['sampled_losses'] + ref['sampled_ties']} replies sampled at T=1, exact match. "
      f"Reward model: held-out pairwise accuracy {pct(rm['pairwise_accuracy'])} (before training "
      f"{pct(rm['init_pairwise_accuracy'])}; on the SFT model's own sampled mistakes "
      f"{pct(rm['pairwise_accuracy.sampled_mistake'])}), {rm['train_seconds']:.0f} s.\n")
print("| model | accuracy (greedy) | " + " | ".join(tasks) + " | accuracy (sampled) | win rate vs SFT, greedy "
      "(W/L/T) | win rate vs SFT, sampled | win rate vs SFT by the reward model | KL to SFT | train time |")
print("|---" * (8 + len(tasks)) + "|")
print(f"| base (pretrained) | {pct(sft['base_task_accuracy'])} | "
      + " | ".join(pct(sft[f'base_task_accuracy.{t}']) for t in tasks) + " | | | | | | |")
print(f"| SFT | {pct(ref['sft_task_accuracy'])} | " + " | ".join(pct(ref[f'sft_task_accuracy.{t}']) for t in tasks)
      + f" | {pct(ref['sft_sampled_accuracy'])} | | | | 0 | {sft['train_seconds']:.0f} s |")
for name, _ in rows:
    m = rl[name]
    print(f"| {name} | {pct(m['policy_task_accuracy'])} | "
          + " | ".join(pct(m[f'policy_task_accuracy.{t}']) for t in tasks)
          + f" | {pct(m['policy_sampled_accuracy'])} | {pct(m['win_rate'])} ({m['wins']}/{m['losses']}/{m['ties']})"
          + f" | {pct(m['sampled_win_rate'])} | {pct(m['rm_win_rate'])} | {m['kl_to_reference']:.3f}"
          + f" | {m['train_seconds']:.0f} s |")
PYEOF
