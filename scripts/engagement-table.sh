#!/usr/bin/env bash
# The engagement table of docs/engagement.md: pretrain genesis-tiny, SFT it and DPO it on engagement data, score each
# stage on the 40 held-out engagement prompts, and put the three side by side with 95% bootstrap intervals over
# prompts and the change from stage to stage (paired by prompt; * where it is beyond noise).
#
#   bash scripts/engagement-table.sh            # from the repository root; about 15 minutes on a 2-core CPU
#
# The data: `python -m genesis_hf.constitution.stage_data` writes the SFT mixture (the embedded conversations plus the
# project's hand-written engagement answers: follow-up questions, refusals with reasons) and the DPO pairs (the
# embedded pairs plus answer-with-question over answer-without, answer over hedge, reasoned over generic refusal, and,
# after SFT, the hand-written answer over the SFT model's own reply to each training prompt); no held-out prompt is in
# either. The stage settings below are what docs/engagement.md ("Stages") found.
#
# Models and scores go to $GENESIS_HF_WORK (default: ./outputs, ignored by git); runs already there are reused
# (pretraining resumes, a finished SFT/DPO and a finished scoring are kept). The pretrained base has no chat
# template, so it is asked in ChatML text (--chat_template chatml): its row is the baseline, not a chat model's score.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${GENESIS_HF_WORK:-$REPO/outputs}"
BIN="$REPO/.venv/bin"
mkdir -p "$WORK"
cd "$WORK/.."
OUT="$(basename "$WORK")"
SFT="${SFT_RUN:-sft-engagement}"
DPO="${DPO_RUN:-dpo-engagement}"
# Stage settings (read by docs/engagement.md's table of what was tried); override for experiments.
SFT_ARGS=(--num_train_epochs "${SFT_EPOCHS:-20}" --learning_rate "${SFT_LR:-3e-3}")
DPO_ARGS=(--num_train_epochs "${DPO_EPOCHS:-1}" --learning_rate "${DPO_LR:-5e-5}" --beta "${DPO_BETA:-0.1}")
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-160}"   # prompt + reply within genesis-tiny's 256 positions

"$BIN/accelerate" launch "$REPO/recipes/pretrain.py" --output_dir "$OUT/genesis-tiny"
"$BIN/python" -m genesis_hf.constitution.stage_data --output_dir "$OUT/stage-data" \
    --embedded_count "${EMBEDDED_COUNT:-60}" ${FOLLOW_UP_ONLY:+--follow_up_only}
[ -f "$OUT/$SFT/final/model.safetensors" ] || "$BIN/accelerate" launch "$REPO/recipes/sft.py" \
    --model_name_or_path "$OUT/genesis-tiny/final" --output_dir "$OUT/$SFT" \
    --mixture "$OUT/stage-data/mixture.yaml" "${SFT_ARGS[@]}"
# On-policy pairs: the SFT model answers the training prompts, and each hand-written answer is preferred over its
# reply (ON_POLICY= turns this off).
if [ -n "${ON_POLICY-1}" ]; then
    REPLIES="$OUT/stage-data/replies-$SFT"
    [ -f "$REPLIES/scores.jsonl" ] || OMP_NUM_THREADS=1 "$BIN/genesis-hf" engagement "$OUT/$SFT/final" \
        --prompts "$OUT/stage-data/train_prompts.jsonl" --output_dir "$REPLIES" --temperature 0 \
        --max_new_tokens "$MAX_NEW_TOKENS"
    "$BIN/python" -m genesis_hf.constitution.stage_data --output_dir "$OUT/stage-data" \
        --embedded_count "${EMBEDDED_COUNT:-60}" ${FOLLOW_UP_ONLY:+--follow_up_only} --on_policy "$REPLIES/scores.jsonl"
fi
[ -f "$OUT/$DPO/final/model.safetensors" ] || "$BIN/accelerate" launch "$REPO/recipes/dpo.py" \
    --model_name_or_path "$OUT/$SFT/final" --output_dir "$OUT/$DPO" \
    --dataset_name "$OUT/stage-data/dpo.jsonl" "${DPO_ARGS[@]}"

# Greedy, one torch thread (tiny models on a small CPU: see benchmarks/constitution.py).
export OMP_NUM_THREADS=1
for run in genesis-tiny "$SFT" "$DPO"; do
    template=()
    [ "$run" = genesis-tiny ] && template=(--chat_template chatml)
    [ -f "$OUT/engagement/$run/engagement.json" ] || "$BIN/genesis-hf" engagement "$OUT/$run/final" \
        --output_dir "$OUT/engagement/$run" --temperature 0 --max_new_tokens "$MAX_NEW_TOKENS" "${template[@]}"
done
rm -f "$OUT/engagement/stages/engagement.md"
"$BIN/genesis-hf" engagement --output_dir "$OUT/engagement/stages" \
    --compare "pretrained=$OUT/engagement/genesis-tiny,sft=$OUT/engagement/$SFT,dpo=$OUT/engagement/$DPO"
{
    echo "# Engagement of the tiny models, stage by stage"
    echo
    echo "Made by \`bash scripts/engagement-table.sh\`: genesis-tiny pretrained, then SFT and DPO on the engagement"
    echo "data of \`genesis_hf.constitution.stage_data\` (settings in the script and docs/engagement.md), each asked the"
    echo "40 held-out \`genesis_hf:engagement\` prompts (greedy, $MAX_NEW_TOKENS new tokens at most; the pretrained model in"
    echo "ChatML text). turn_end_rate is over all 40 prompts, the harmful and specific refusal numbers over the 10"
    echo "harmful ones, the other rates over the 30 benign ones; per-category rates are in"
    echo "\`$OUT/engagement/<run>/engagement.json\`."
    echo
    cat "$OUT/engagement/stages/engagement.md"
} > "$REPO/docs/engagement-table.md"
echo "wrote $REPO/docs/engagement-table.md"
