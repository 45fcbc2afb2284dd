#!/usr/bin/env bash
# Reproduce the paper's experiments and figures.
#
#   ./run.sh test            the test suite (the README's test command)
#   ./run.sh smoke [OUT]     every script for 2 steps on the tiny config, in seconds
#   ./run.sh quick [OUT]     the paper's experiments at CPU scale (small config, embedded data):
#                            figures + results in OUT (measured on 2 CPU cores: see README)
#   ./run.sh seeds [OUT]     after quick, in its OUT: Figures 2-3, seeds 1-2 of Figure 1, the oracle
#                            gap, GN ablations, the inner solve's exactness along a run
#   ./run.sh full  [OUT]     the same plan at the paper's scale (45m; SIZE=150m for 150m) on
#                            GPUs/TPUs with C4 (DATA=dir of C4 shards); prints an estimate first
#
# Plan (quick and full), every method from one shared AdamW checkpoint as the paper does, at
# K micro-batches per (outer) step, with no warmup for any method (the same policy for all):
#   1. start:   quick: AdamW from scratch -> OUT/start/ckpt; full: the scripts' built-in paper
#               start (--start paper: 1000 AdamW steps, trained once and cached)
#   2. sweeps:  each baseline at 3 lrs for SWEEP steps, with the settings of its Figure-1 run; a
#               best lr (lowest validation loss at step SWEEP) at the grid's edge extends the grid
#               (x3 or /3, twice at most). Figure 1's baseline run is the best sweep run, resumed
#               to BASE steps
#   3. target:  the best baseline's validation loss at 80% of BASE (OUT/target.txt, unrounded)
#   4. GN:      GN's inner lr swept the same way (3 lrs, SWEEP steps, stopping at the target;
#               best = fewest steps to the target); layerwise and prox-linear (constant lr, with
#               and without line search) at GN's lr until the target or GN_CAP steps
#   5. fig2/3:  AdamW, SOAP and GN at BUDGET micro-batches for the smaller batch sizes (the
#               Figure-1 runs give the point at K); quick leaves them to the seeds mode
#   6. plot.py: figures and OUT/results.md
# ./run.sh seeds OUT (after quick) runs Figures 2-3, reruns the start, GN and the two best
# baselines for seeds 1 and 2 (Figure 1's error bars), measures the oracle gap (oracle.py: how
# much of the GN step AdamW, Muon and SOAP capture) along the baselines' Figure-1 runs, runs
# GN's ablations, and measures the exactness of GN's inner solve along a run.
set -euo pipefail
cd "$(dirname "$0")"
mode=${1:-}
out=${2:-results/${mode/seeds/quick}}
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

extend() {  # extend DIR SCRIPT ARGS...: resume the finished run DIR with new ARGS (--steps)
  local dir=$1; shift
  if [ -f "$dir/extended" ]; then echo "== $dir: extended, skipped"; return; fi
  echo "== $dir (resumed): $*"
  if ! $py "$@" --out "$dir" --resume >> "$dir/stdout.log" 2>&1; then
    tail -n 3 "$dir/stdout.log"; echo "run.sh: $dir failed; see $dir/stdout.log" >&2; exit 1
  fi
  grep -E "^(done:|target loss)" "$dir/stdout.log" | tail -n 1 || true
  touch "$dir/extended"
}

pick() {  # pick WHAT ARGS...: plot.py's choices from the logs (best lr, next grid lr, target, ...)
  $py plot.py --pick "$@"
}

sweep() {  # sweep NAME SCRIPT "LRS" ARGS...: the lr sweep of one method; prints the best run dir
  local name=$1 script=$2 lrs=$3; shift 3   # (RANK="--target T": rank by steps to T first)
  for lr in $lrs; do run "$out/sweep/${name}_$lr" "$script" "$@" --lr "$lr" >&2; done
  for _ in 1 2; do  # a best lr at the grid's edge extends the grid
    local next; next=$(pick next-lr ${RANK:-} "$out"/sweep/"${name}"_*)
    [ -z "$next" ] && break
    run "$out/sweep/${name}_$next" "$script" "$@" --lr "$next" >&2
  done
  pick best ${RANK:-} "$out"/sweep/"${name}"_*
}

plan() {  # plan SIZE DATA K START_STEPS START_LR SWEEP BASE GN_CAP BUDGET "BATCHES" [SEED]
  local size=$1 data=$2 K=$3 start_steps=$4 start_lr=$5 sweep_steps=$6 base=$7 cap=$8
  local budget=$9 batches=${10} seed=${11:-0}
  local S="--size $size --data $data --seed $seed $EXTRA" E="--eval-every 1"
  local o=$out; [ "$seed" = 0 ] || o=$out/seeds/seed$seed
  mkdir -p "$o"
  if [ "$start_steps" != builtin ]; then
    run "$o/start" adamw.py --size "$size" --data "$data" --seed "$seed" --grad-accum 1 \
        --steps "$start_steps" --lr "$start_lr" --eval-every "$start_steps"
    S="$S --init-from $o/start/ckpt"
  fi
  local B="--grad-accum $K --schedule constant"
  if [ "$seed" != 0 ]; then  # seeds: Figure 1's lrs and target, GN and the two best baselines
    local target; target=$(cat "$out/target.txt")
    for m in $(pick two-best --target "$target" "$out"/fig1/{adamw,muon,soap}); do
      run "$o/$m" "$m.py" $S $B --steps "$base" --lr "$(pick lr "$out/fig1/$m")" $E --target-loss "$target"
    done
    run "$o/gn_full" gn_full.py $S --inner-steps "$K" --steps "$cap" --lr "$(pick lr "$out/fig1/gn_full")" \
        $E --target-loss "$target" --model-change
    return
  fi
  # 2. baseline sweeps; Figure 1 continues each best run
  local m best
  for m in adamw muon soap; do
    local lrs=SWEEP_${m^^}
    best=$(sweep "$m" "$m.py" "${!lrs}" $S $B --steps "$sweep_steps" $E)
    if [ ! -d "$o/fig1/$m" ]; then mkdir -p "$o/fig1" && cp -r "$best" "$o/fig1/$m"; fi
    extend "$o/fig1/$m" "$m.py" $S $B --steps "$base" --lr "$(pick lr "$best")" $E
  done
  # 3. the target: the best baseline's loss at 80% of its budget, unrounded
  local at=$(( base * 8 / 10 ))
  pick target "$at" "$o"/fig1/{adamw,muon,soap} > "$o/target.txt"
  local target; target=$(cat "$o/target.txt")
  echo "target loss $target: the best baseline's validation loss at step $at of $base"
  # 4. GN's inner lr swept as the baselines' lrs; then its variants at GN's lr
  local G="--inner-steps $K $E --target-loss $target"
  best=$(RANK="--target $target" sweep gn_full gn_full.py "$SWEEP_GN" $S $G --steps "$sweep_steps" --model-change)
  if [ ! -d "$o/fig1/gn_full" ]; then cp -r "$best" "$o/fig1/gn_full"; fi
  local lr_gn; lr_gn=$(pick lr "$best")
  if [ "$(pick reached --target "$target" "$o/fig1/gn_full")" = no ]; then
    extend "$o/fig1/gn_full" gn_full.py $S $G --steps "$cap" --lr "$lr_gn" --model-change
  fi
  run "$o/fig1/gn_layerwise" gn_layerwise.py $S $G --steps "$cap" --lr "$lr_gn"
  run "$o/fig1/gn_proxlinear_no_ls" gn_proxlinear.py $S $G --steps "$cap" --lr "$lr_gn" \
      --schedule constant --ls-batches 0
  run "$o/fig1/gn_proxlinear" gn_proxlinear.py $S $G --steps "$cap" --lr "$lr_gn" --schedule constant \
      --ls-batches 2
  # 5. Figures 2-3 (quick: in the seeds mode, which keeps quick within an hour)
  [ -n "${FIG2_LATER:-}" ] || batch_sizes "$S" "$budget" "$batches"
  # 6. figures and results.md
  $py plot.py "$o"
}

batch_sizes() {  # batch_sizes S BUDGET "BATCHES": Figures 2-3, AdamW, SOAP and GN at Figure 1's
  local S=$1 budget=$2 b                  # lrs, BUDGET micro-batches at each smaller batch size
  for b in $3; do                         # (the Figure-1 runs give the point at K)
    local steps=$(( budget / b )) every=$(( budget / b / 8 > 1 ? budget / b / 8 : 1 ))
    local F="--steps $steps --eval-every $every"
    run "$out/fig2/adamw_b$b" adamw.py $S --grad-accum "$b" --schedule constant $F --lr "$(pick lr "$out/fig1/adamw")"
    run "$out/fig2/soap_b$b" soap.py $S --grad-accum "$b" --schedule constant $F --lr "$(pick lr "$out/fig1/soap")"
    run "$out/fig2/gn_full_b$b" gn_full.py $S --inner-steps "$b" $F --lr "$(pick lr "$out/fig1/gn_full")" $FIG2_GN
  done
}

seeds() {  # after the main plan: Figures 2-3, the seeds, the oracle gap, GN's ablations, exactness
  local K=$1 cap=$2 target; shift 2
  batch_sizes "--size $1 --data $2 --seed 0 $EXTRA --init-from $out/start/ckpt" "$9" "${10}"
  for s in 1 2; do plan "$@" "$s"; done
  target=$(cat "$out/target.txt")
  run "$out/oracle" oracle.py --results "$out" $ORACLE
  local S="--size $1 --data $2 $EXTRA --init-from $out/start/ckpt --inner-steps $K"
  S="$S --eval-every 1 --steps $cap --lr $(pick lr "$out/fig1/gn_full") --target-loss $target"
  run "$out/ablations/gn_no_linesearch" gn_full.py $S --ls-batches 0
  run "$out/ablations/gn_reset_start" gn_full.py $S --reset-start
  run "$out/ablations/gn_cg" gn_full.py $S --solver cg
  # CG with 4x the curvature data and 2x the iterations (160 G v micro-batch products per step,
  # 5x those of GN's 32 inner steps; about 2 minutes per step here, hence 6 steps)
  run "$out/ablations/gn_cg_curv8_iters20" gn_full.py $S --solver cg --curvature-batches 8 \
      --cg-iters 20 --steps 6
  # exactness along a run (--measure-exactness) at tiny: its reference solve, up to 2000 CG
  # iterations, would take up to 15 minutes per outer step at small (bench.py: 0.87 s per CG
  # iteration on 32 x 128 tokens, so about 0.44 s on a 16 x 128 micro-batch)
  run "$out/exactness/tiny" gn_full.py --size tiny --data "$2" --inner-steps "$K" --steps "$cap" \
      --eval-every 1 --measure-exactness
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
  quick|seeds)
    SWEEP_ADAMW="3e-4 1e-3 3e-3" SWEEP_MUON="0.01 0.02 0.04" SWEEP_SOAP="3e-3 1e-2 3e-2"
    SWEEP_GN="3e-3 1e-2 3e-2" FIG2_LATER=1 EXTRA="--batch-size 16" ORACLE="--points 0,8,14 --lams 3e-2,1e-1 --cg-iters 20 --tol 2e-2"
    FIG2_GN="--ls-batches 1"    # at 2 micro-batches per step, 2 line-search batches would double GN's cost
    # small config, BBC; K = 32 micro-batches of 16 x 128 (65,536 tokens) per step; sweeps of 8
    # steps; baselines 14 steps, GN variants at most 10; Figures 2-3 (in the seeds mode) at
    # 128 micro-batches. The grids are centred on the best lrs that a first run of this plan
    # found after extending them (SOAP from 1e-3..1e-2, GN from 1e-3..1e-2): the plan still
    # checks that each best lies inside its grid, and no time goes to extensions
    args=(small "${DATA:-bbc}" 32 150 3e-3 8 14 10 128 "2 8")
    if [ "$mode" = quick ]; then time plan "${args[@]}"; else time seeds 32 10 "${args[@]}"; fi ;;
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
  start 1 min; baseline sweeps 9 x 10 steps ~6 min and their Figure-1 runs to 227 steps ~44 min;
  GN's sweep 3 x 10 steps ~8 min and its Figure-1 run (227 x 15.2 s at most: it stops at the
  target) ~1 h; prox-linear with and without line search ~1 h; layerwise ~3.4 h; Figures 2-3
  (3904 micro-batches at 16, 61 and 244 per step) ~40 min: about 7 hours in all at 45m,
  and ~3x that at 150m. On a 2-core CPU the start alone takes about a day and one 45m outer step
  about 5 hours. DATA=${DATA:-bbc}: the scripts warn when it is read more than once (use C4).
EOF
    time plan "$size" "${DATA:-bbc}" 122 builtin 0.01 10 227 227 3904 "16 61 244" ;;
  *)
    sed -n '2,20p' "$0"; exit 2 ;;
esac
