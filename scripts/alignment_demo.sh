#!/usr/bin/env bash
# The alignment comparison: base -> SFT -> PPO and DPO on the same held-out prompts.
#   bash scripts/alignment_demo.sh     # runs the pipeline first if data/rlhf is missing
# The pipeline's rlhf stage trains the algorithm configs/rlhf.yaml names (into data/rlhf, the
# registered model); this script then trains the other one from the same SFT and reward models
# through the stage's CLI (its own MLflow run, into data/rlhf_<algorithm>, not a DVC output) and
# prints the table the README shows.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"

[ -f data/rlhf/metrics.json ] || "$PY" -m flows.llm --no-push
done_algo=$("$PY" -c "import json; print(json.load(open('data/rlhf/metrics.json'))['algorithm'])")
other=$([ "$done_algo" = ppo ] && echo dpo || echo ppo)
"$PY" -m tasks.rlhf algorithm="$other" out_dir="data/rlhf_$other"

"$PY" - "$done_algo" "$other" <<'PYEOF'
import json, sys
from pathlib import Path

done_algo, other = sys.argv[1:]
read = lambda p: json.loads(Path(p).read_text())
sft, rm = read("data/sft/metrics.json"), read("data/reward/metrics.json")
rl = {done_algo: read("data/rlhf/metrics.json"), other: read(f"data/rlhf_{other}/metrics.json")}
tasks = ("add", "reverse", "count", "copy")
pct = lambda x: f"{100 * x:.1f}%"
ref = rl["ppo"]
print(f"\nHeld-out verifiable prompts: {ref['held_out_prompts']} ({', '.join(tasks)}); greedy replies and "
      f"{ref['sampled_wins'] + ref['sampled_losses'] + ref['sampled_ties']} replies sampled at T=1, exact match. "
      f"Reward model: held-out pairwise accuracy {pct(rm['pairwise_accuracy'])} (before training "
      f"{pct(rm['init_pairwise_accuracy'])}; on the SFT model's own sampled mistakes "
      f"{pct(rm['pairwise_accuracy.sampled_mistake'])}), {rm['train_seconds']:.0f} s.\n")
print("| model | accuracy (greedy) | " + " | ".join(tasks) + " | accuracy (sampled) | win rate vs SFT, greedy "
      "(W/L/T) | win rate vs SFT, sampled | win rate vs SFT by the reward model | KL to SFT | train time |")
print("|---" * (9 + len(tasks)) + "|")
print(f"| base (pretrained) | {pct(sft['base_task_accuracy'])} | "
      + " | ".join(pct(sft[f'base_task_accuracy.{t}']) for t in tasks) + " | | | | | | |")
print(f"| SFT | {pct(ref['sft_task_accuracy'])} | " + " | ".join(pct(ref[f'sft_task_accuracy.{t}']) for t in tasks)
      + f" | {pct(ref['sft_sampled_accuracy'])} | | | | 0 | {sft['train_seconds']:.0f} s |")
for name in ("ppo", "dpo"):
    m = rl[name]
    print(f"| {name.upper()} | {pct(m['policy_task_accuracy'])} | "
          + " | ".join(pct(m[f'policy_task_accuracy.{t}']) for t in tasks)
          + f" | {pct(m['policy_sampled_accuracy'])} | {pct(m['win_rate'])} ({m['wins']}/{m['losses']}/{m['ties']})"
          + f" | {pct(m['sampled_win_rate'])} | {pct(m['rm_win_rate'])} | {m['kl_to_reference']:.3f}"
          + f" | {m['train_seconds']:.0f} s |")
PYEOF
