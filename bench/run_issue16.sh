#!/usr/bin/env bash
# Issue 16's side-by-side numbers (docs/PERFORMANCE.md, "Issue 16: before and after"), in one go:
# the commit before the issue's changes (BEFORE, default df299f4) is checked out into a temporary
# git worktree and every comparison alternates its `porter` with this checkout's, round by round.
# Writes the megatron-trtllm, megatron-trtllm-4gib and megatron-hf sections of
# docs/PERFORMANCE.md and leaves the raw results in $OUT (default bench/out/issue16).
#
# Usage: bench/run_issue16.sh [BEFORE]      (about 30 minutes on the 2-core sandbox when idle)
# Environment: ROUNDS (5), TRT_WORKERS ("1 2 4"), HF_ROUNDS (3), and STEPS, the parts to run
# (default "cli ablation trt1 tp2 hf hfbench trt4 queue").
set -euo pipefail
cd "$(dirname "$0")/.."
BEFORE_REV=${1:-df299f4}
PY=.venv/bin/python
OUT=${OUT:-bench/out/issue16}
ROUNDS=${ROUNDS:-5}
TRT_WORKERS=${TRT_WORKERS:-1 2 4}
HF_ROUNDS=${HF_ROUNDS:-3}
STEPS=" ${STEPS:-cli ablation trt1 tp2 hf hfbench trt4 queue} "
step() { [[ "$STEPS" == *" $1 "* ]]; }
mkdir -p "$OUT"
TMP=$(mktemp -d /tmp/porter-issue16-XXXXXX)
trap 'git worktree remove --force "$TMP/before" >/dev/null 2>&1 || true; rm -rf "$TMP"' EXIT
git worktree add --detach "$TMP/before" "$BEFORE_REV" >/dev/null
BEFORE="$TMP/before"
say() { echo "[$(date -u +%H:%M:%S) load $(cut -d' ' -f1-3 /proc/loadavg)] $*" | tee -a "$OUT/log.txt" >&2; }

if step cli; then
  say "CLI start-up"
  $PY bench/run_cli_startup.py --runs 10 --before "$BEFORE" > "$OUT/cli.txt"
fi

say "sources: 1 GiB TP=1 and its TP=2 split"
$PY bench/synthetic_checkpoint.py "$TMP/src" --json > "$OUT/source.json"
(cd bench && ../$PY -c "import sys; from pathlib import Path; from run_megatron_hf import \
write_tp_variant; write_tp_variant(Path(sys.argv[1]), Path(sys.argv[2]), 2)" "$TMP/src" "$TMP/src-tp2")

if step ablation; then
  say "write path, one change undone at a time (warm page cache, then cold source)"
  $PY bench/write_path_ablation.py "$TMP/src" "$TMP/ablation" --rounds "$ROUNDS" > "$OUT/ablation.txt"
  $PY bench/write_path_ablation.py "$TMP/src" "$TMP/ablation" --rounds 3 --cold \
      --variants now one-chunk > "$OUT/ablation-cold.txt"
fi

if step trt1; then
  say "Megatron -> TensorRT-LLM, 1 GiB, TP=1 -> TP=4 (docs section megatron-trtllm)"
  # shellcheck disable=SC2086
  $PY bench/run_megatron_trtllm.py --rounds "$ROUNDS" --workers $TRT_WORKERS --before "$BEFORE" \
      --json "$OUT/trtllm-1gib.json" > "$OUT/trtllm-1gib.txt"
fi

if step tp2; then
  say "Megatron -> TensorRT-LLM, TP=2 -> TP=4 source"
  $PY bench/ab_convert.py "$TMP/src-tp2" --before "$BEFORE" --rounds "$ROUNDS" --copy-bound \
      --json "$OUT/trtllm-tp2.json" -- megatron-trtllm --tp 4 --workers 1 > "$OUT/trtllm-tp2.txt"
fi

if step hf; then
  say "Megatron -> HF, before and after, TP=1 and TP=2 sources"
  for s in src src-tp2; do
    $PY bench/ab_convert.py "$TMP/$s" --before "$BEFORE" --rounds "$ROUNDS" --copy-bound \
        --json "$OUT/hf-$s.json" -- megatron-hf --workers 1 > "$OUT/hf-$s.txt"
  done
fi
rm -rf "$TMP/src" "$TMP/src-tp2"

if step trt4; then
  say "Megatron -> TensorRT-LLM, 4 GiB (docs section megatron-trtllm-4gib)"
  $PY bench/run_megatron_trtllm.py --rounds 3 --workers 1 --layers 45 --before "$BEFORE" \
      --section megatron-trtllm-4gib --json "$OUT/trtllm-4gib.json" > "$OUT/trtllm-4gib.txt"
fi

if step hfbench; then
  say "Megatron -> HF against full materialisation (docs section megatron-hf)"
  $PY bench/run_megatron_hf.py --rounds "$HF_ROUNDS" --results "$OUT/hf.json" > "$OUT/hf.txt"
fi

if step queue; then
  say "queue overhead: now, then before (run_distributed.py part 1, no doc)"
  $PY bench/run_distributed.py --skip-scaling --no-doc --runs "$ROUNDS" > "$OUT/queue-now.txt"
  (cd "$BEFORE" && PYTHONPATH="$BEFORE" "$OLDPWD/$PY" bench/run_distributed.py --skip-scaling \
      --no-doc --runs "$ROUNDS") > "$OUT/queue-before.txt"
fi
say "done"
