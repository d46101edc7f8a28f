#!/usr/bin/env bash
# On the device machine: . .whl/preamble.sh; bash scripts/gpu_exactness.sh   (files land in $OUT)
# What it checks: after_surgery == baseline through the CLI with fla's short convolution, on the small preset
# and then on the 48B architecture (PRESETS=small: the small one only). EVAL_S: seconds allowed per eval (default 200;
# a fresh machine's first eval compiles fla's kernels for its shapes, which took more than 200 s on 2026-12-04).
set -uo pipefail
S=$OUT; W=/tmp/w; mkdir -p $W
. scripts/gpu_parts.sh; restore_triton_cache  # kernels an earlier machine compiled (.triton_carry/), if carried
CLI=(--set data=stdlib+arithmetic --set max_chars_per_source=20000)
part() { local name=$1 limit=$2; shift 2; local s=$SECONDS
  timeout "$limit" "$@" > "$S/$name.txt" 2>&1; echo "== $name: exit $? after $((SECONDS - s)) s" | tee -a "$S/summary.txt"; }
PRESETS=${PRESETS:-small kimi_linear_48b_a3b}
for P in $PRESETS; do
  L=50; [ $P = small ] || L=25; L=${LIMIT:-$L}
  rm -rf eval_results
  part surgery_$P 150 python3 -m rkl surgery --model $P --out $W/$P "${CLI[@]}"
  for stage in baseline after_surgery; do
    part eval_${stage}_$P ${EVAL_S:-200} python3 -m rkl eval --stage $stage --model $W/$P --limit $L "${CLI[@]}"
  done
  python3 -m rkl compare baseline after_surgery > $S/compare_$P.txt 2>&1; echo "compare exit $?" >> $S/compare_$P.txt
  for f in eval_results/*.json; do cp $f $S/${P}_$(basename $f); done
done
[ -n "${SAVE_TRITON:-}" ] && save_triton_cache "$S"
cat $S/summary.txt; for P in $PRESETS; do echo "== compare $P"; head -c 2500 $S/compare_$P.txt; done
for f in $S/eval_*; do echo "== $f"; tail -n 3 $f; done
