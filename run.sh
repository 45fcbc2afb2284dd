#!/usr/bin/env bash
# Reproduce the paper's experiments and figures.
#
#   ./run.sh test            the test suite (the README's test command)
#   ./run.sh smoke [OUT]     every script for 2 steps on the tiny config, in seconds
#   ./run.sh quick [OUT]     the paper's experiments at CPU scale (small config, embedded data):
#                            under 60 minutes on 2 CPU cores; figures + results in OUT
#   ./run.sh full  [OUT]     the same plan at the paper's scale (45m; SIZE=150m for 150m) on
#                            GPUs/TPUs with C4 (DATA=dir of C4 shards); prints an estimate first
#
# Plan (quick and full), every method starting from one shared AdamW checkpoint as the paper does:
#   1. start:     quick: AdamW from scratch -> OUT/start/ckpt; full: the scripts' built-in paper
#                 start (--start paper: 1000 AdamW steps, trained once and cached)
#   2. sweeps:    short lr sweeps of AdamW, Muon, SOAP from the start (grids below); later runs
#                 use each method's best lr (lowest final validation loss)
#   3. fig1:      all six methods at the same large batch (K micro-batches per step)
#   4. target:    the best baseline's validation loss at 80% of its fig1 budget (OUT/target.txt)
#   5. fig2/3:    AdamW, SOAP and GN at a fixed token budget for several batch sizes
#   6. ablations: GN without line search, without warm start, and with the CG solver
#   7. plot.py:   figures (PNG) and OUT/results_table.md
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-}
out=${2:-results/$mode}
py=${PYTHON:-python}

run() {  # run DIR SCRIPT ARGS...: skip runs that already finished (rerunning resumes the plan)
  local dir=$1; shift
  if [ -f "$dir/done" ]; then echo "== $dir: done, skipped"; return; fi
  echo "== $dir: $*"
  rm -rf "$dir" && mkdir -p "$dir"
  if ! $py "$@" --out "$dir" > "$dir/stdout.log" 2>&1; then
    tail -n 3 "$dir/stdout.log"; echo "run.sh: $dir failed; see $dir/stdout.log" >&2; exit 1
  fi
  grep -E "^(step 0:|done:|target loss)" "$dir/stdout.log" || true
  touch "$dir/done"
}

best_lr() {  # best_lr DIR...: the --lr of the run with the lowest final validation loss
  $py - "$@" <<'EOF'
import json, sys
def final(d):
    return [json.loads(l) for l in open(d + "/metrics.jsonl") if "val_loss" in l][-1]["val_loss"]
best = min(sys.argv[1:], key=final)
print(json.load(open(best + "/config.json"))["args"]["lr"])
EOF
}

target_loss() {  # target_loss STEP DIR...: the lowest validation loss at STEP among the runs
  $py - "$@" <<'EOF'
import json, sys
step = int(sys.argv[1])
vals = [r["val_loss"] for d in sys.argv[2:] for r in map(json.loads, open(d + "/metrics.jsonl"))
        if r["step"] == step and "val_loss" in r]
print(f"{min(vals):.4f}")
EOF
}

plan() {  # plan SIZE DATA K START_STEPS START_LR FIG1_BASE FIG1_GN FIG1_LW SWEEP BUDGET "BATCHES"
  local size=$1 data=$2 K=$3 start_steps=$4 start_lr=$5 base_steps=$6 gn_steps=$7 lw_steps=$8
  local sweep=$9 budget=${10} batches=${11}
  local S="--size $size --data $data $EXTRA"
  mkdir -p "$out"
  if [ "$start_steps" != builtin ]; then
    run "$out/start" adamw.py --size "$size" --data "$data" --grad-accum 1 --steps "$start_steps" \
        --lr "$start_lr" --eval-every "$start_steps"
    S="$S --init-from $out/start/ckpt"
  fi
  # 2. lr sweeps (short warmup: a fresh Adam state at a high lr wrecks a warm-started model)
  for lr in $SWEEP_ADAMW; do run "$out/sweep/adamw_$lr" adamw.py $S --grad-accum "$K" --steps "$sweep" \
      --lr "$lr" --schedule warmup_constant --warmup 2 --eval-every "$sweep"; done
  for lr in $SWEEP_MUON; do run "$out/sweep/muon_$lr" muon.py $S --grad-accum "$K" --steps "$sweep" \
      --lr "$lr" --schedule warmup_constant --warmup 2 --eval-every "$sweep"; done
  for lr in $SWEEP_SOAP; do run "$out/sweep/soap_$lr" soap.py $S --grad-accum "$K" --steps "$sweep" \
      --lr "$lr" --schedule warmup_constant --warmup 2 --eval-every "$sweep"; done
  local lr_adamw lr_muon lr_soap
  lr_adamw=$(best_lr "$out"/sweep/adamw_*); lr_muon=$(best_lr "$out"/sweep/muon_*)
  lr_soap=$(best_lr "$out"/sweep/soap_*)
  echo "best lr: adamw $lr_adamw, muon $lr_muon, soap $lr_soap" | tee "$out/best_lr.txt"
  local W="--schedule warmup_constant --warmup 2 --eval-every 1"
  # 3. Figure 1: every method at K micro-batches per (outer) step
  run "$out/fig1/adamw" adamw.py $S --grad-accum "$K" --steps "$base_steps" --lr "$lr_adamw" $W
  run "$out/fig1/muon" muon.py $S --grad-accum "$K" --steps "$base_steps" --lr "$lr_muon" $W
  run "$out/fig1/soap" soap.py $S --grad-accum "$K" --steps "$base_steps" --lr "$lr_soap" $W
  run "$out/fig1/gn_full" gn_full.py $S --inner-steps "$K" --steps "$gn_steps" --eval-every 1
  run "$out/fig1/gn_proxlinear" gn_proxlinear.py $S --inner-steps "$K" --steps "$gn_steps" --eval-every 1
  run "$out/fig1/gn_layerwise" gn_layerwise.py $S --inner-steps "$K" --steps "$lw_steps" --eval-every 1
  # 4. the target: the best baseline's loss at 80% of its budget
  local at=$(( base_steps * 8 / 10 ))
  target_loss "$at" "$out"/fig1/{adamw,muon,soap} > "$out/target.txt"
  echo "target loss $(cat "$out/target.txt"): the best baseline's validation loss at step $at of $base_steps"
  # 5. Figures 2-3: a fixed budget of $budget micro-batches at several batch sizes
  for b in $batches; do
    local steps=$(( budget / b ))
    run "$out/fig2/adamw_b$b" adamw.py $S --grad-accum "$b" --steps "$steps" --lr "$lr_adamw" $W
    run "$out/fig2/soap_b$b" soap.py $S --grad-accum "$b" --steps "$steps" --lr "$lr_soap" $W
    run "$out/fig2/gn_full_b$b" gn_full.py $S --inner-steps "$b" --steps "$steps" --eval-every 1 $FIG2_GN
  done
  # 6. ablations of GN (fig1's gn_full is the reference)
  mkdir -p "$out/ablations" && rm -rf "$out/ablations/gn_full" && cp -r "$out/fig1/gn_full" "$out/ablations/gn_full"
  run "$out/ablations/gn_no_linesearch" gn_full.py $S --inner-steps "$K" --steps "$lw_steps" --ls-batches 0 --eval-every 1
  run "$out/ablations/gn_reset_start" gn_full.py $S --inner-steps "$K" --steps "$lw_steps" --reset-start --eval-every 1
  run "$out/ablations/gn_cg" gn_full.py $S --inner-steps "$K" --steps "$lw_steps" --solver cg --eval-every 1
  # 7. figures and table
  $py plot.py "$out"
}

case "$mode" in
  test)
    exec $py -m pytest -q test_all.py ;;
  smoke)
    for s in adamw muon soap gn_full gn_layerwise gn_proxlinear; do
      rm -rf "$out/$s"
      $py $s.py --size tiny --steps 2 --eval-every 1 --out "$out/$s" | tail -n 1
    done ;;
  quick)
    SWEEP_ADAMW="3e-4 1e-3 3e-3" SWEEP_MUON="0.005 0.01 0.02" SWEEP_SOAP="1e-3 3e-3 1e-2" EXTRA=""
    FIG2_GN="--ls-batches 1"    # at 2 micro-batches per step, 2 line-search batches would double GN's cost
    # small config, BBC; K = 8 micro-batches of 32 x 128 (32k tokens) per step; budget 64 micro-batches
    time plan small "${DATA:-bbc}" 8 150 3e-3 20 10 5 3 64 "2 8 32" ;;
  full)
    size=${SIZE:-45m}
    SWEEP_ADAMW="0.003 0.01 0.03" SWEEP_MUON="0.003 0.01 0.03" SWEEP_SOAP="0.001 0.003 0.01" FIG2_GN=""
    EXTRA="--dtype ${DTYPE:-bfloat16} --split ${SPLIT:-1}"
    # the paper: 32 x 1024 micro-batches, 122 per step (~4M tokens), the built-in 1000-step start
    cat <<EOF
full plan at $size ($EXTRA), from the measured speed at 45m on one H100 in bf16: an AdamW step
(122 x 32 x 1024 tokens) 4.07 s, a GN outer step 15.2 s, the shared start 49 s (Muon, SOAP,
layerwise and prox-linear steps were not measured; layerwise ~ (L+2)/2 GN steps, prox-linear
without line search ~ half of one):
  start 1 min; sweeps 9 x 10 steps ~6 min; Figure 1: 3 x 227 baseline steps ~46 min, GN 227 x
  15.2 s ~58 min, prox-linear ~30 min, layerwise ~3.4 h; Figures 2-3 (3904 micro-batches each
  at 4 batch sizes) ~50 min; ablations 3 x 227 GN steps ~2.5 h: about 9 hours in all at 45m,
  and ~3x that at 150m. On a 2-core CPU the start alone takes about a day and one 45m outer step
  about 5 hours. DATA=${DATA:-bbc}: the scripts warn when it is read more than once (use C4).
EOF
    time plan "$size" "${DATA:-bbc}" 122 builtin 0.01 227 227 227 10 3904 "16 61 122 244" ;;
  *)
    sed -n '2,20p' "$0"; exit 2 ;;
esac
