#!/usr/bin/env bash
# The engagement table of the tiny models in docs/engagement.md: pretrain genesis-tiny, SFT it, DPO it (the README's
# CPU defaults), score each on the held-out engagement prompts, and put the three side by side.
#
#   bash scripts/engagement-table.sh            # from the repository root; about 10-20 minutes on a 2-core CPU
#
# Models and scores go to $GENESIS_HF_WORK (default: ./outputs, ignored by git); runs already there are reused
# (pretraining resumes, a finished SFT/DPO is kept). The pretrained base has no chat template, so it is asked in
# ChatML text (--chat_template chatml): its row is the baseline, not a chat model's score.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${GENESIS_HF_WORK:-$REPO/outputs}"
BIN="$REPO/.venv/bin"
mkdir -p "$WORK"
cd "$WORK/.."
OUT="$(basename "$WORK")"

"$BIN/accelerate" launch "$REPO/recipes/pretrain.py" --output_dir "$OUT/genesis-tiny"
[ -f "$OUT/sft-tiny/final/model.safetensors" ] || "$BIN/accelerate" launch "$REPO/recipes/sft.py" \
    --model_name_or_path "$OUT/genesis-tiny/final" --output_dir "$OUT/sft-tiny"
[ -f "$OUT/dpo-tiny/final/model.safetensors" ] || "$BIN/accelerate" launch "$REPO/recipes/dpo.py" \
    --model_name_or_path "$OUT/sft-tiny/final" --output_dir "$OUT/dpo-tiny"

# Greedy, 64 new tokens, one torch thread (tiny models on a small CPU: see benchmarks/constitution.py).
export OMP_NUM_THREADS=1
for run in genesis-tiny sft-tiny dpo-tiny; do
    template=()
    [ "$run" = genesis-tiny ] && template=(--chat_template chatml)
    "$BIN/genesis-hf" engagement "$OUT/$run/final" --output_dir "$OUT/engagement/$run" \
        --temperature 0 --max_new_tokens 64 "${template[@]}"
done
"$BIN/genesis-hf" engagement --output_dir "$OUT/engagement" \
    --compare "pretrained=$OUT/engagement/genesis-tiny,sft=$OUT/engagement/sft-tiny,dpo=$OUT/engagement/dpo-tiny"
{
    echo "# Engagement of the tiny models"
    echo
    echo "Made by \`bash scripts/engagement-table.sh\`: genesis-tiny pretrained, then SFT and DPO with the README's CPU"
    echo "defaults, each asked the 40 held-out \`genesis_hf:engagement\` prompts (greedy, 64 new tokens; the pretrained"
    echo "model in ChatML text). Rates over benign prompts, except the last two (harmful prompts); per-category rates"
    echo "are in \`$OUT/engagement/<run>/engagement.json\`."
    echo
    cat "$OUT/engagement/engagement.md"
} > "$REPO/docs/engagement-table.md"
echo "wrote $REPO/docs/engagement-table.md"
