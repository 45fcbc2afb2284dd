#!/usr/bin/env bash
# Reproduce the paper's experiments and figures.
#
#   ./run.sh test               the test suite (the README's test command)
#   ./run.sh smoke [OUT]        every script for 2 steps on the tiny config, in seconds
#   ./run.sh quick [OUT]        the paper's experiments at CPU scale (small config, embedded data):
#                               the baselines' and GN's Figure-1 rows, each swept (OUT: results/quick)
#   ./run.sh variants [OUT]     after quick, in its OUT: layerwise GN and prox-linear (with and
#                               without line search), each swept
#   ./run.sh kfac [OUT]         after quick: K-FAC (beyond the paper), its lr and damping swept
#   ./run.sh seeds [OUT]        after those: seeds 1-2 of every Figure-1 row
#   ./run.sh extras [OUT]       after quick: Figures 2-3, GN's ablations, the oracle gap and the
#                               inner solve's exactness (oracle.py)
#   ./run.sh axes GROUP [OUT]   after quick, in its OUT: the ratio along one axis that separates it
#                               from the paper's Figure 1 (GROUP n: GN's inner steps; tokens: per
#                               step; depth: of the target; later: training four times as long at
#                               16,384 tokens per step), each point in OUT/axes/<point>;
#                               POINTS="p ..." only those, SEEDS="1 2" with seeds, VARIANTS=1 with
#                               layerwise and prox-linear, KFAC=1 with K-FAC (Figure 1 at a point)
#   ./run.sh full [OUT]         Figures 1 and 2 as the paper ran them, at 150m on GPUs/TPUs with C4
#                               (DATA=dir of C4 shards). SIZE=45m: the authors' templates'
#                               experiment instead (4M tokens per step); SIZE=tiny: a CPU rehearsal
#                               of the same plan; PAPER_LRS=1: every row at its script's lr, unswept
#   ./run.sh reject [OUT]       GN's rejection of a step that no eta > 0 improves, at a too-large
#                               inner lr from random init: with and without it (5 minutes)
#   ./run.sh gpu-check [OUT]    the one-GPU acceptance check (at most 8 minutes): OUT/report.md
#   ./run.sh MODE ... --dry-run every run the mode would make (its command line) and the decisions
#                               it would take, running nothing (full: each run's tokens, passes of
#                               the data and estimated H100-hours, and the other plan's cost)
#   ./run.sh --help             these modes and the variables that change a plan
#
# Plan (quick and full), every method from one shared AdamW checkpoint as the paper does:
#   1. start:   quick: AdamW from scratch -> OUT/start/ckpt; full: the scripts' built-in paper
#               start (--start paper: at 150m 4578 AdamW steps, trained once and cached)
#   2. sweeps:  each baseline's lr grid (3 lrs), every lr run to the budget (quick: 14 steps;
#               full: the script's --steps at the size) with its Figure-1 settings, or to the
#               target when it is fixed. LRS="adamw=3e-3 gn_full=3e-3 ..." gives a row's lr and
#               skips its sweep
#   3. target:  full: TARGET (150m: 3.25, the paper's); quick and 45m: the lowest validation loss
#               any run of the baselines' grids reaches at 80% of the budget (OUT/target.txt)
#   4. rows:    one rule ranks every row's sweep (plot.py's rank_key): fewest interpolated steps
#               to the target, then the lowest final loss; a best lr at its grid's edge extends the
#               grid (x3 or /3, twice at most); Figure 1's row is its sweep's best run. GN full and
#               its variants (layerwise, prox-linear with and without line search) are swept over
#               SWEEP_GN, each run stopping at the target; quick and seeds: also K-FAC (kfac.py), its
#               lr at the middle damping, then the damping at that lr (the grid extended x10);
#               quick, seeds and axes (LONG): Figure 1's GN rows then run on past the target to their
#               budget, and the baselines and K-FAC to GN's loss at its last step (r(k), plot.py)
#   5. fig2/3:  a fixed token budget at several batch sizes, each method at its Figure-1 lr
#               (150m: 3B tokens, 1.2M to 120M tokens per step); quick leaves them to extras
#   6. plot.py: figures and OUT/results.md
# Rerunning the same command resumes the plan: finished runs are skipped, an interrupted one
# (Ctrl-C, SIGTERM, a job's time limit; or a run given --stop-at) resumes from its checkpoint.
# Multi-host: LAUNCH="srun --ntasks-per-node 1" EXTRA=--distributed ./run.sh full (train the
# start once on one host first: the first run's error names its command).
set -euo pipefail
cd "$(dirname "$0")"
dry="" args=()   # --dry-run (any mode, anywhere): print the plan, run nothing
for a in "$@"; do if [ "$a" = --dry-run ]; then dry=1; else args+=("$a"); fi; done
set -- ${args[@]+"${args[@]}"}
mode=${1:-}
case $mode in variants|kfac|seeds|extras) out=${2:-results/quick} ;; *) out=${2:-results/$mode} ;; esac
if [ -n "$dry" ]; then plan_file=$(mktemp); trap 'rm -f "$plan_file"' EXIT; fi
py=${PYTHON:-python}
fig=fig1

run() {  # run DIR SCRIPT ARGS...: skip a finished run that is what ARGS ask; resume an interrupted
  local dir=$1; shift   # one, or a finished one at the same lr given a longer budget or lower target
  if [ -n "$dry" ]; then   # (each command line listed once)
    grep -v "^decision" "$plan_file" | grep -qF "	$dir	$*	" || printf '%s\t%s\t%s\t%s\n' "$fig" "$dir" "$*" "$(state "$dir" "$@")" >> "$plan_file"
    return
  fi
  if [ -f "$dir/done" ]; then
    case $(pick made-with "$dir" "$@") in
      yes) echo "== $dir: done, skipped"; return ;;
      longer) rm "$dir/done" ;;
      *) echo "== $dir: made at another lr or damping: again"; rm -rf "$dir" ;;
    esac
  fi
  local resume=""
  if [ -e "$dir/ckpt" ]; then resume=--resume; echo "== $dir (resumed): $*"
  else echo "== $dir: $*"; rm -rf "$dir" && mkdir -p "$dir"; fi   # (a log without its checkpoint: again)
  train "$dir" "$@" $resume
  grep -E "^(step 0:|done:|target loss)" "$dir/stdout.log" | tail -n 2 || true
  touch "$dir/done"
}

decide() {  # decide DIR "TEXT": a dry run lists the choice that makes DIR (a real run takes it)
  [ -z "$dry" ] || printf '%s\t%s\t%s\n' decision "$1" "$2" >> "$plan_file"
}

results() {  # results DIR: plot.py's figures and results.md (not in a dry run)
  [ -n "$dry" ] || $py plot.py "$1"
}

state() {  # state DIR SCRIPT ARGS...: what a dry run says of a planned run
  if [[ "$*" == *_OF_* || "$*" == *TARGET* ]]; then echo "after the picks it needs"
  elif [ -f "$1/done" ]; then
    case $($py plot.py --pick made-with "$@") in yes) echo done ;; longer) echo "done; to run on" ;; *) echo "again" ;; esac
  elif [ -e "$1/ckpt" ]; then echo "to resume"; else echo "to run"; fi
}

grow() {  # grow DIR SRC: DIR starts as a copy of the finished run SRC, which run then continues to
  local dir=$1 src=$2   # DIR's budget or target (GROW_FROM; exact only where the lr schedule is constant:
  if [ -n "$dry" ]; then [ -z "${GROW_FROM:-}" ] || [ ! -e "$src/ckpt" ] || decide "$dir" "grown from $src"; return 0; fi
  [ -n "${GROW_FROM:-}" ] && [ ! -e "$dir" ] && [ -f "$src/done" ] && [ -e "$src/ckpt" ] \
    && grep -q '"schedule": "constant"' "$src/config.json" || return 0   # a run's first steps then do
  mkdir -p "$(dirname "$dir")" && cp -r "$src" "$dir" && echo "$src" > "$dir/grown_from"   # not depend
  echo "== $dir: grown from $src"                                                          # on its budget)
}

adopt() {  # adopt BEST DIR: Figure 1's row DIR is a copy of its sweep's best run (again if that changes)
  if [ -n "$dry" ]; then decide "$2" "a copy of its sweep's best run by plot.py's rank_key (steps to TARGET)"; return; fi
  if [ "$(cat "$2/from" 2>/dev/null)" != "$1" ]; then
    rm -rf "$2" && mkdir -p "$(dirname "$2")" && cp -r "$1" "$2" && echo "$1" > "$2/from"
    echo "== $2: the best of its sweep, $1"
  fi
}

train() {  # train DIR SCRIPT ARGS...: one run, appending to DIR/stdout.log; stops run.sh unless it finished
  local dir=$1 script=$2; shift 2
  if ! ${LAUNCH:-} $py "$script" "$@" --out "$dir" >> "$dir/stdout.log" 2>&1; then
    tail -n 3 "$dir/stdout.log"; echo "run.sh: $dir failed; see $dir/stdout.log" >&2; exit 1
  fi
  if tail -n 2 "$dir/stdout.log" | grep -q "^interrupted:"; then
    tail -n 1 "$dir/stdout.log"; echo "run.sh: $dir stopped at a checkpoint; rerun the same command to go on" >&2
    exit 3
  fi
}

target_of() {  # target_of OUT: the plan's target (OUT/target.txt; a dry run's, named until made)
  if [ -n "$dry" ] && [ ! -f "$1/target.txt" ]; then echo TARGET; else cat "$1/target.txt"; fi
}

pick() {  # pick WHAT ARGS...: plot.py's choices from the logs (best lr, next grid lr, target, ...)
  if [ -n "$dry" ]; then  # a dry run: the choice from the logs where they exist, else named; no
    local logs=$2; [ "$1" = target ] && logs=${3:-}                                   # grid extended
    if [ "$1" != made-with ] && [ -e "$logs" ] && $py plot.py --pick "$@" 2>/dev/null; then return; fi
    case $1 in lr|damping) echo "${1^^}_OF_${2##*/}" ;; target) echo TARGET ;; final) echo FINAL_OF_${2##*/} ;;
      made-with) echo yes ;; *) echo "" ;; esac
    return
  fi
  $py plot.py --pick "$@"
}

lr_given() {  # lr_given METHOD: its lr in LRS ("" if none)
  local kv; for kv in ${LRS:-}; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; return 0
}

sweep() {  # sweep NAME "LRS" SCRIPT ARGS...: one method's lr sweep, ranked by steps to $target
  local name=$1 lrs=$2; shift 2   # (plot.py's one rule); prints the best run's directory
  for lr in $lrs; do
    grow "$out/sweep/${name}_$lr" "${GROW_FROM:-}/sweep/${name}_$lr" >&2
    run "$out/sweep/${name}_$lr" "$@" --lr "$lr" >&2
  done
  if [ -n "$dry" ]; then
    decide "$out/sweep/${name}_*" "a best lr at the grid's edge ($lrs) extends it (x3 or /3, twice at most)"
    set -- $lrs; echo "$out/sweep/${name}_$2"; return   # (the middle lr)
  fi
  local runs=("$out"/sweep/"${name}"_[0-9]*) next   # a best lr at the grid's edge extends the grid,
  while [ ${#runs[@]} -lt $(( $(wc -w <<< "$lrs") + 2 )) ]; do   # by 2 lrs at most (a rerun: none more)
    next=$(pick next-lr --target "$target" "${runs[@]}"); [ -z "$next" ] && break
    grow "$out/sweep/${name}_$next" "${GROW_FROM:-}/sweep/${name}_$next" >&2
    run "$out/sweep/${name}_$next" "$@" --lr "$next" >&2
    runs=("$out"/sweep/"${name}"_[0-9]*)
  done
  pick best --target "$target" "$out"/sweep/"${name}"_[0-9]*
}

steps_of() {  # steps_of METHOD: "--steps N" from CAP_<method>, or nothing (the script's preset)
  local c=CAP_$1; [ -n "${!c:-}" ] && echo "--steps ${!c}"; return 0
}

start() {  # start O SEED: the shared AdamW start O/start/ckpt (START="STEPS LR"), trained again
  local o=$1 seed=$2    # where a clone has its committed log but not its checkpoint
  if [ -z "$dry" ] && [ -f "$o/start/done" ] && [ ! -e "$o/start/ckpt" ]; then
    echo "== $o/start: no checkpoint (a clone of the logs); trained again"; rm -rf "$o/start"
  fi
  run "$o/start" adamw.py --size "$size" --data "$data" --seed "$seed" --grad-accum 1 \
      --steps "${START% *}" --lr "${START#* }" --eval-every "${START% *}"
}

# The mode sets: size data START ("builtin", "STEPS LR" or "from:DIR": DIR's starts), B_<method>
# (each method's batch flags), SWEEP_<METHOD> (lr grids; SWEEP_GN also the GN variants'),
# CAP_<method> (its budget; empty: the script's --steps), TARGET (empty: the 80% rule), GN_EXTRA,
# PROX, BUDGET and BATCHES (Figures 2-3), FIG2_METHODS; KFAC=1 with KFAC_LAMS, SWEEP_KFAC; the axes'
# points also BASE_FROM (its baselines, linked, and its target) and VARIANTS ("": no layerwise or
# prox-linear).
row() {  # row METHOD: Figure 1's row METHOD as SCRIPT ARGS (no lr, seed or target)
  local B=B_$1 E="--eval-every 1"
  case $1 in
    adamw|muon|soap) echo "$1.py ${!B} $(steps_of "$1") $E" ;;
    gn_full) echo "gn_full.py $B_gn $(steps_of gn_full) $E $GN_EXTRA" ;;
    gn_layerwise) echo "gn_layerwise.py $B_gn $(steps_of gn_layerwise) $E" ;;
    gn_proxlinear_no_ls) echo "gn_proxlinear.py $B_gn $(steps_of gn_proxlinear) $E $PROX --ls-batches 0" ;;
    gn_proxlinear) # its line search on GN's tokens: GN's --ls-batches (given, or its default PROX_LS)
      local ls; ls=$(sed -n 's/.*--ls-batches \([0-9]*\).*/\1/p' <<< "$B_gn")
      echo "gn_proxlinear.py $B_gn $(steps_of gn_proxlinear) $E $PROX --ls-batches ${ls:-$PROX_LS}" ;;
    kfac) echo "kfac.py $B_kfac $(steps_of kfac) $E" ;;
  esac
}

rows() {  # Figure 1's rows in this plan (ROWS: those alone)
  if [ -n "${ROWS:-}" ]; then echo "$ROWS"; return; fi
  echo "adamw muon soap gn_full"
  [ -z "${VARIANTS-1}" ] || echo "gn_layerwise gn_proxlinear_no_ls gn_proxlinear"
  [ -z "${KFAC:-}" ] || echo kfac
}

plan() {  # plan [SEED]
  local seed=${1:-0} o=$out m best lr
  [ "$seed" = 0 ] || o=$out/seeds/seed$seed
  local S="--size $size --data $data --seed $seed $EXTRA"
  [ -n "$dry" ] || mkdir -p "$o"
  fig=fig1
  if [ "${START#from:}" != "$START" ]; then   # from:DIR, the starts of DIR's plan (each seed's)
    local d=${START#from:}; [ "$seed" = 0 ] || d=$d/seeds/seed$seed
    S="$S --init-from $d/start/ckpt"
  elif [ "$START" != builtin ]; then
    start "$o" "$seed"
    S="$S --init-from $o/start/ckpt"
  fi
  local target
  if [ "$seed" != 0 ]; then  # seeds: every Figure-1 row at its lr (K-FAC: and lam), to the target
    target=$(target_of "$out")
    for m in $(rows); do
      if [ -L "$out/fig1/$m" ]; then   # BASE_FROM's baseline: its seed's run too
        [ -n "$dry" ] || ln -sfn "$(realpath --relative-to="$o" "$BASE_FROM/seeds/seed$seed/$m")" "$o/$m"
        continue
      fi
      [ -n "$dry" ] || [ -d "$out/fig1/$m" ] || continue
      local lam=""; [ "$m" = kfac ] && lam="--damping $(pick damping "$out/fig1/kfac")"
      grow "$o/$m" "${GROW_FROM:-}/seeds/seed$seed/$m"
      run "$o/$m" $(row "$m") $S --lr "$(pick lr "$out/fig1/$m")" $lam --target-loss "$target"
    done
    longer "$o" "$S"
    return
  fi
  # 2. the baselines' lr grids, every lr to its budget (to TARGET when that is fixed: the 80%
  #    rule needs the whole budget); a baseline in LRS runs at its given lr alone. BASE_FROM=DIR
  #    (a point that moves GN's settings only): DIR's baselines and target instead
  local T="" grid=""; [ -n "$TARGET" ] && T="--target-loss $TARGET"
  for m in adamw muon soap; do
    if [ -n "${BASE_FROM:-}" ]; then
      [ -n "$dry" ] || { mkdir -p "$o/fig1" && ln -sfn "$(realpath --relative-to="$o/fig1" "$BASE_FROM/fig1/$m")" "$o/fig1/$m"; }
      continue
    fi
    lr=$(lr_given "$m")
    if [ -n "$lr" ]; then run "$o/fig1/$m" $(row "$m") $S $T --lr "$lr"; grid="$grid $o/fig1/$m"; continue; fi
    local g=SWEEP_${m^^}
    for lr in ${!g}; do
      grow "$out/sweep/${m}_$lr" "${GROW_FROM:-}/sweep/${m}_$lr"
      run "$out/sweep/${m}_$lr" $(row "$m") $S $T --lr "$lr"; grid="$grid $out/sweep/${m}_$lr"
    done
  done
  # 3. the target: TARGET, or the lowest validation loss any run of the baselines' grids reaches
  #    at 80% of its budget, unrounded
  target=$TARGET
  if [ -n "${BASE_FROM:-}" ]; then
    target=$(target_of "$BASE_FROM")
  elif [ -z "$target" ]; then
    local at=$(( CAP_adamw * 8 / 10 ))
    target=$(pick target "$at" $grid)
    decide "$o/target.txt" "TARGET: the lowest validation loss of the baselines' grids at step $at"
    [ -n "$dry" ] || echo "target loss $target: the baselines' lowest validation loss at step $at of $CAP_adamw"
  fi
  [ -n "$dry" ] || echo "$target" > "$o/target.txt"
  # 4. one rule for every row (plot.py's rank_key): fewest interpolated steps to the target, then
  #    the lowest final loss; a best lr at its grid's edge extends the grid; Figure 1's row is the
  #    best sweep run. The baselines' sweeps are those of step 2; every other run stops at the target.
  local G="--target-loss $target"
  for m in $(rows); do
    lr=$(lr_given "$m")
    case $m in
      adamw|muon|soap)   # (those of step 2; not those given in LRS or BASE_FROM's)
        [ -z "${BASE_FROM:-}" ] && [ -z "$lr" ] || continue
        local g=SWEEP_${m^^}; best=$(sweep "$m" "${!g}" $(row "$m") $S $T) ;;
      *)
        if [ -n "$lr" ]; then run "$o/fig1/$m" $(row "$m") $S --lr "$lr" $G; continue; fi
        if [ "$m" = kfac ]; then best=$(kfac_sweep "$S $G")
        else best=$(sweep "$m" "$SWEEP_GN" $(row "$m") $S $G); fi ;;
    esac
    adopt "$best" "$o/fig1/$m"
  done
  longer "$o/fig1" "$S"
  # 5. Figures 2-3 (quick: in the extras mode)
  [ -n "${FIG2_LATER:-}" ] || batch_sizes "$S"
  # 6. figures and results.md
  results "$o"
}

longer() {  # longer DIR "ARGS": past the target, for r(k) (LONG: steps): DIR's GN rows (a seed's, or
  local d=$1 S=$2 m lam end="" from   # fig1's) run on to their budget, then its baselines and K-FAC on to
  [ -n "${LONG:-}" ] || return 0   # GN's validation loss at its last step, at most LONG steps (a row
  for m in $(rows) - $(rows); do   # linked from BASE_FROM: grown in that plan)
    if [ "$m" = - ]; then
      end=$(pick final "$d/gn_full"); decide "$d" "past the target: the baselines and K-FAC on to $end (GN's last loss)"; continue
    fi
    [ -n "$dry" ] || { [ -d "$d/$m" ] && [ ! -L "$d/$m" ]; } || continue
    lam=""; [ "$m" = kfac ] && lam="--damping $(pick damping "$out/fig1/kfac")"
    from=$(cat "$d/$m/from" 2>/dev/null || true)   # (Figure 1's row: its sweep's best run, grown)
    case $m in
      gn_*) [ -z "$end" ] || continue; run "$d/$m" $(row "$m") $S --lr "$(pick lr "$out/fig1/$m")" ;;
      *) [ -n "$end" ] || continue
         run "$d/$m" $(row "$m") $S --lr "$(pick lr "$out/fig1/$m")" $lam --steps "$LONG" --target-loss "$end" ;;
    esac
    [ -z "$from" ] || [ -n "$dry" ] || echo "$from" > "$d/$m/from"
  done
}

kfac_sweep() {  # kfac_sweep "ARGS": K-FAC's lr over SWEEP_KFAC at the middle lam of KFAC_LAMS,
  local lams=($KFAC_LAMS) lam lr_k next   # then lam over KFAC_LAMS at that lr, each grid extended
  local lam0=${lams[1]}                   # at its edge (lam x10); prints the best run's directory
  lr_k=$(sweep "kfac_lam$lam0" "$SWEEP_KFAC" $(row kfac) $1 --damping "$lam0")
  lr_k=${lr_k##*_}                        # (the best run's lr as its directory spells it)
  for lam in "${lams[@]}"; do
    [ "$lam" = "$lam0" ] || run "$out/sweep/kfac_lam${lam}_$lr_k" $(row kfac) $1 --damping "$lam" --lr "$lr_k" >&2
  done
  if [ -n "$dry" ]; then
    decide "$out/sweep/kfac_lam*_$lr_k" "a best lam at the grid's edge ($KFAC_LAMS) extends it (x10 or /10, twice at most)"
    echo "$out/sweep/kfac_lam${lam0}_$lr_k"; return
  fi
  local runs=("$out"/sweep/kfac_lam*_"$lr_k")
  while [ ${#runs[@]} -lt $(( ${#lams[@]} + 2 )) ]; do
    next=$(pick next-damping --target "$target" "${runs[@]}"); [ -z "$next" ] && break
    run "$out/sweep/kfac_lam${next}_$lr_k" $(row kfac) $1 --damping "$next" --lr "$lr_k" >&2
    runs=("$out"/sweep/kfac_lam*_"$lr_k")
  done
  pick best --target "$target" "$out"/sweep/kfac_lam*_*
}

batch_sizes() {  # batch_sizes S: Figures 2-3, each of FIG2_METHODS at its Figure-1 lr, BUDGET
  local S=$1 b m                     # micro-batches at each batch size in BATCHES
  fig=fig2
  for b in $BATCHES; do
    local steps=$(( BUDGET / b )) every=$(( BUDGET / b / 8 > 1 ? BUDGET / b / 8 : 1 ))
    local F="--steps $steps --eval-every $every"
    for m in $FIG2_METHODS; do
      local B="--grad-accum $b --schedule constant"
      [ "$m" = gn_full ] && B="--inner-steps $b --ls-batches ${FIG2_LS:-$b}"   # the authors': N fresh batches
      run "$out/fig2/${m}_b$b" "$m.py" $S $B $F --lr "$(pick lr "$out/fig1/$m")"
    done
  done
}

extras() {  # after quick: Figures 2-3, GN's ablations, the oracle gap and the inner solve's exactness
  local target cap=$CAP_gn_full
  batch_sizes "--size $size --data $data --seed 0 $EXTRA --init-from $out/start/ckpt"
  fig=fig1
  target=$(target_of "$out")
  local S="--size $size --data $data $EXTRA --init-from $out/start/ckpt $B_gn"
  S="$S --eval-every 1 --steps $cap --lr $(pick lr "$out/fig1/gn_full") --target-loss $target"
  run "$out/ablations/gn_no_linesearch" gn_full.py $S --ls-batches 0
  run "$out/ablations/gn_reset_start" gn_full.py $S --reset-start
  run "$out/ablations/gn_inner_adamw" gn_full.py $S --inner-opt adamw   # (the paper's: Muon)
  # Hessian-free CG on GN's outer batch and line search (no lr: CG's step is its own)
  local C="--size $size --data $data $EXTRA --init-from $out/start/ckpt ${B_gn/--inner-steps/--outer-batches}"
  C="$C --eval-every 1 --steps $cap --target-loss $target"
  run "$out/ablations/gn_cg" gn_cg.py $C
  # CG with 4x the curvature data and 2x the iterations (160 G v micro-batch products per step,
  # 5x those of GN's 32 inner steps; about 2 minutes per step here, hence 6 steps)
  run "$out/ablations/gn_cg_curv8_iters20" gn_cg.py $C --curvature-batches 8 --cg-iters 20 --steps 6
  run "$out/oracle" oracle.py --results "$out" $ORACLE
  results "$out"
}

point() {  # point NAME VAR=VALUE...: quick's plan at one point of an axis, in OUT/axes/NAME, from
  local name=$1 s; shift   # quick's start; BASE_FROM=OUT: quick's baselines (linked) and target.
  [ -z "${POINTS:-}" ] || [[ " $POINTS " == *" $name "* ]] || return 0   # POINTS: only these
  start "$out" 0
  for s in ${SEEDS:-}; do start "$out/seeds/seed$s" "$s"; done          # SEEDS: these seeds too
  ( START=from:$out out=$out/axes/$name VARIANTS=${VARIANTS:-}          # VARIANTS=1: layerwise, prox
    for kv in "$@"; do declare "$kv"; done
    plan
    for s in ${SEEDS:-}; do plan "$s"; done
    [ -z "${SEEDS:-}" ] || results "$out" )   # the point's results.md, seeds too
}

axes() {  # axes GROUP: after quick, in its OUT, the ratio along the axes that separate it from
  local q=$out      # the paper's Figure 1 (docs/cpu-results.md's "what matches"); each point's lrs swept
  case $1 in        # as quick's, its target by quick's 80% rule at its own budget
    n)  # inner steps N at quick's 65,536 tokens per step (quick: N = 32 of 16 x 128), the
        # line-search tokens held at quick's 4,096 where a micro-batch allows (N = 8: 8,192)
      point n8 BASE_FROM="$q" EXTRA="--batch-size 64" B_gn="--inner-steps 8 --ls-batches 1"
      point n128 BASE_FROM="$q" EXTRA="--batch-size 4" B_gn="--inner-steps 128 --ls-batches 8" ;;
    tokens)  # tokens per step at quick's 32 micro-batches and 14-step budget: 16,384, 32,768 and
      # 131,072 (quick: 65,536; 131,072 reads the data about 1.5 times), every method swept at each
      point tok16k EXTRA="--batch-size 4"
      point tok32k EXTRA="--batch-size 8"
      point tok131k EXTRA="--batch-size 32" ;;
    later)  # later training at 16,384 tokens per step: a 60-step budget (about one pass of the
      # data), GN to 24 steps, every method swept at it; each run grown from tok16k's at its lr
      point tok16k_long EXTRA="--batch-size 4" CAP_adamw=60 CAP_muon=60 CAP_soap=60 CAP_gn_full=24 \
            LONG=60 GROW_FROM="$q/axes/tok16k" ;;
    depth)  # a shallower target (an 8-step budget) and the deepest that 2 passes of the data allow
      # (a 28-step budget), every baseline swept to its budget
      # (r(k) needs no target: depth8's GN rows are quick's runs, so none runs past it there, LONG="")
      point depth8 CAP_adamw=8 CAP_muon=8 CAP_soap=8 CAP_gn_full=8 CAP_gn_layerwise=8 CAP_gn_proxlinear=8 CAP_kfac=8 LONG=
      # (a 28-step budget; each run grown from quick's run at its lr where one exists: the same first 14 steps)
      point depth28 CAP_adamw=28 CAP_muon=28 CAP_soap=28 CAP_gn_full=16 GROW_FROM="$q" ;;
    *) echo "run.sh axes: GROUP must be n, tokens, depth or later (got '${1:-}')" >&2; exit 2 ;;
  esac
  results "$q"
}

quick_settings() {  # the small config on BBC, for quick, seeds and axes
  size=small data=${DATA:-bbc} START="150 3e-3" TARGET=""
  SWEEP_ADAMW="3e-4 1e-3 3e-3" SWEEP_MUON="0.01 0.02 0.04" SWEEP_SOAP="3e-3 1e-2 3e-2" SWEEP_GN="3e-3 1e-2 3e-2"
  CAP_adamw=14 CAP_muon=14 CAP_soap=14 CAP_gn_full=10 CAP_gn_layerwise=10 CAP_gn_proxlinear=10
  B_adamw="--grad-accum 32 --schedule constant" B_muon=$B_adamw B_soap=$B_adamw B_gn="--inner-steps 32"
  B_kfac=$B_adamw SWEEP_KFAC="3e-3 1e-2 3e-2" KFAC_LAMS="1e-5 1e-4 1e-3" CAP_kfac=14
  GN_EXTRA=--model-change PROX="--schedule constant" PROX_LS=2 LONG=28
  FIG2_LATER=1 FIG2_METHODS="adamw soap gn_full" BUDGET=128 BATCHES="2 8"
  EXTRA="--batch-size 16" ORACLE="--points 0,1,8 --lams 3e-2,1e-1 --micro-batches 8 --cg-iters 20 --tol 2e-2"
  FIG2_LS=1    # at 2 micro-batches per step, 2 line-search batches would double GN's cost
  # small config, BBC; K = 32 micro-batches of 16 x 128 (65,536 tokens) per step; a budget of
  # 14 steps (GN and its variants at most 10; past the target, Figure 1's rows run on: GN's to 10,
  # the baselines' and K-FAC's to GN's loss at its 10th step or 28 steps); Figures 2-3 (in the extras mode) at 128
  # micro-batches. The grids are centred on the best lrs that earlier runs of this plan found
  # (SOAP from 1e-3..1e-2, GN from 1e-3..1e-2, K-FAC from lam 1e-4..1e-2 and lr 0.01..0.1); the
  # plan still extends a grid whose best lies at its edge
}

gpu_check() {  # the one-GPU acceptance check: each part under a timeout, one markdown report
  local o=$1 big=${SIZE:-45m} mem=(${MEMORY:-150m 128 16}) t0=$SECONDS work=${CHECK_WORK:-}
  local report=$o/report.md
  if [ -n "$dry" ]; then work=${work:-WORK}
  else   # checkpoints and the token cache stay out of OUT
    [ -n "$work" ] || work=$(mktemp -d)
    mkdir -p "$o"
    { echo "# GPU check"; echo
      echo "$(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null || echo -), $($py -c 'import jax; d = jax.devices(); print(f"jax {jax.__version__}, {len(d)} x {d[0].device_kind}")')"
    } > "$report"
  fi
  part() {  # part NAME TIMEOUT CMD...: run CMD under the timeout; its exit, time and output's tail
    local name=$1 limit=$2 t=$SECONDS rc=0; shift 2
    if [ -n "$dry" ]; then printf 'gpu-check\t%s\ttimeout %s %s\n' "$o/$name.log" "$limit" "$(printf '%q ' "$@")" >> "$plan_file"; return; fi
    echo "== $name: $*"
    timeout "$limit" "$@" > "$o/$name.log" 2>&1 || rc=$?
    { echo; echo "## $name"; echo; echo "\`$*\`: exit $rc in $((SECONDS - t)) s (limit $limit s)"
      echo; echo '```'; grep -vE "^\[bench|^ *$|^step [0-9]+/20 " "$o/$name.log" | tail -n 25; echo '```'; } >> "$report"
  }
  # 1. the GN maths tests at full precision on the device (the suite pins --dtype float32), in this
  # one process (-n 0: two test workers would each take the device's memory)
  part maths 100 $py -m pytest -q -x -n 0 -m "not slow" test_all.py \
       -k "${MATHS_K:-model_ce or gn_full_ or gn_layerwise_ or gn_proxlinear_}"
  # 2. the paper-size GN run from a short start, in bf16 and as the paper ran fp32 (TF32)
  for dt in bfloat16 tf32; do
    part "gn_full_${big}_$dt" 110 $py gn_full.py --size "$big" --start-steps 20 --steps 2 \
         --eval-every 1 --split 1 --dtype "$dt" --out "$work/gn_full_$dt" --cache-dir "$work/cache" ${CHECK_EXTRA:-}
    [ -n "$dry" ] || cp "$work/gn_full_$dt/metrics.jsonl" "$o/gn_full_${big}_$dt.metrics.jsonl" 2>/dev/null || true
  done
  # 3. the GN building blocks at the paper size; 4. XLA's memory analysis of a Figure-1 GN step
  # (MEMORY: 150m, 128 x 1024 at --split 16: 48.7 GiB on CPU; bench.py --sections memory searches the splits)
  part "blocks_$big" 80 $py bench.py --size "$big" --sections blocks --repeats 3 --alloc-rounds 0 ${BENCH_EXTRA:-}
  part "memory_${mem[0]}" 90 $py -c 'import sys, bench; size, b, s = sys.argv[1], *map(int, sys.argv[2:]); gib = bench.analysed_gib("gn_full", b, s, size); print(f"gn_full step at {size}, {b}-sequence micro-batch, --split {s}: {gib:.1f} GiB")' \
       "${mem[@]}"
  [ -n "$dry" ] || echo "gpu-check: $((SECONDS - t0)) s; report $report"
}

show_plan() {  # show_plan WHAT: a dry run's plan, every run's command line and every decision
  echo "run.sh $1: the plan (nothing was run)"; echo
  echo "| figure | command | now |"; echo "|---|---|---|"
  awk -F'\t' -v py="$py" '$1 == "gpu-check" {printf "| %s | `%s > %s` | |\n", $1, $3, $2}
    $1 != "decision" && $1 != "gpu-check" {printf "| %s | `%s %s --out %s` | %s |\n", $1, py, $3, $2, $4}' "$plan_file"
  decisions
}

decisions() {  # the decisions of a dry run's plan, one line each
  grep -q "^decision" "$plan_file" || return 0
  echo; echo "Decisions, taken from the runs' logs as the plan goes (plot.py --pick):"
  awk -F'\t' '$1 == "decision" {printf "- %s: %s\n", $2, $3}' "$plan_file"
}

paper_lrs() {  # "adamw=LR ...": every Figure-1 row at its script's preset lr at $size (sources: its --help)
  $py -c 'import sys, adamw, muon, soap, gn_full as f, gn_layerwise as l, gn_proxlinear as p
lr = lambda m: m.parse(["--size", sys.argv[1]]).lr
print(" ".join(f"{n}={lr(m)!r}" for n, m in [("adamw", adamw), ("muon", muon), ("soap", soap), ("gn_full", f),
      ("gn_layerwise", l), ("gn_proxlinear", p), ("gn_proxlinear_no_ls", p)]))' "$size"
}

usage() {  # the modes (this file's header) and the variables that change a plan
  sed -n '2,30p' "$0" | sed -e 's/^#//' -e 's/^ //'
  cat <<'EOF'

Variables that change a plan (default in brackets):
  DATA       the corpus [bbc, the embedded BBC news; full: a directory of C4 shards]
  SIZE       full: 150m, 45m or tiny [150m]; gpu-check: its GN run's size [45m]
  TARGET     full: the target loss [150m: 3.25; else the baselines' lowest loss at 80% of the budget]
  LRS        "method=lr ...": a row's lr, its sweep skipped [none]
  PAPER_LRS  full: 1 runs every row at its script's preset lr at SIZE, no sweeps (the lr's source:
             `python SCRIPT.py --size SIZE --help`) [unset: every row swept]
  ROWS       Figure 1's rows of the plan [adamw muon soap gn_full, the variants, K-FAC where set]
  VARIANTS   axes: 1 adds layerwise GN and prox-linear [unset]; quick and seeds: always
  KFAC       axes: 1 adds K-FAC [unset]; quick and seeds: always
  POINTS     axes: only these points [every point of GROUP]
  SEEDS      axes: these seeds too, e.g. "1 2" [none]
  EXTRA      flags every run gets [none]
  DTYPE      full: --dtype of every run [each script's]
  SPLIT      full: --split of every run [each script's]
  LAUNCH     a launcher before every run, e.g. "srun --ntasks-per-node 1" [none]
  PYTHON     the interpreter [python]
  MEMORY     gpu-check: "SIZE BATCH SPLIT" of its memory analysis [150m 128 16]
  CHECK_WORK, CHECK_EXTRA, BENCH_EXTRA, MATHS_K
             gpu-check: its work directory [a temporary one], flags for its GN runs and its
             bench.py run [none], and the maths tests' -k [the GN maths]
EOF
}

case "$mode" in
  -h|--help|help)
    usage ;;
  test)
    if [ -n "$dry" ]; then echo "$py -m pytest -q test_all.py"; exit; fi
    exec $py -m pytest -q test_all.py ;;
  smoke)
    for s in adamw muon soap gn_full gn_cg gn_layerwise gn_proxlinear kfac; do
      if [ -n "$dry" ]; then fig=smoke run "$out/$s" "$s.py" --size tiny --steps 2 --eval-every 1; continue; fi
      rm -rf "$out/$s"
      $py $s.py --size tiny --steps 2 --eval-every 1 --out "$out/$s" | tail -n 1
    done
    [ -z "$dry" ] || show_plan smoke ;;
  quick|variants|kfac|seeds|extras)   # quick's plan in pieces of at most 100 minutes each
    quick_settings; KFAC=1      # (axes: quick_settings alone; K-FAC with KFAC=1)
    case $mode in
      quick) time ROWS="adamw muon soap gn_full" plan ;;
      variants) time ROWS="gn_layerwise gn_proxlinear_no_ls gn_proxlinear" plan ;;
      kfac) time ROWS=kfac plan ;;
      seeds) time (for s in 1 2; do plan "$s"; done; results "$out") ;;
      extras) time extras ;;
    esac
    [ -z "$dry" ] || show_plan "$mode" ;;
  axes)
    quick_settings; out=${3:-results/quick}
    time axes "${2:-}"
    [ -z "$dry" ] || show_plan "axes ${2:-}" ;;
  full)
    size=${SIZE:-150m} data=${DATA:-bbc} START=builtin
    SWEEP_ADAMW="0.001 0.003 0.01" SWEEP_MUON="0.001 0.003 0.01" SWEEP_SOAP="0.001 0.003 0.01" SWEEP_GN="0.001 0.003 0.01"
    B_adamw="" B_muon="" B_soap="" B_gn="" GN_EXTRA="" PROX="" FIG2_METHODS="adamw muon soap gn_full"
    CAP_adamw="" CAP_muon="" CAP_soap="" CAP_gn_full="" CAP_gn_layerwise="" CAP_gn_proxlinear=""
    EXTRA="${EXTRA:-} ${DTYPE:+--dtype $DTYPE} ${SPLIT:+--split $SPLIT}"
    case $size in
      150m)  # Figure 1: GN 1831 x 128 x 1024 = 240M tokens per step, AdamW and Muon 40M, SOAP 240M
        # (the scripts' 150m presets: --help names each value's source); every sweep run to 3.25 or
        # its budget; Figure 2: 3B tokens (22,888 micro-batches of 128 x 1024) at 1.2M, 4.1M, 12.1M, 40M
        # and 120M tokens per step
        what="Figure 1 as the paper ran it, and Figure 2" TARGET=${TARGET:-3.25} PROX_LS=1831
        BUDGET=22888 BATCHES="9 31 92 305 916" ;;
      45m)   # the authors' templates: 122 x 32 x 1024 = 4M tokens per step for every method, 227
        # steps, a 1000-step start; the target by the 80% rule; Figures 2-3 at 3904 micro-batches
        what="the authors' 45M templates' experiment (not Figure 1)" TARGET=${TARGET:-} PROX_LS=122 CAP_adamw=227
        SWEEP_ADAMW="0.003 0.01 0.03" SWEEP_MUON="0.003 0.01 0.03" SWEEP_GN="0.003 0.01 0.03"
        BUDGET=3904 BATCHES="16 61 244" ;;
      tiny)  # the CPU rehearsal of the same plan: tiny presets, a 4-step built-in start
        what="the CPU rehearsal of the 150m plan" TARGET=${TARGET:-} PROX_LS=1 CAP_adamw=4 EXTRA="$EXTRA --start paper --start-steps 4" SWEEP_GN="0.01 0.03 0.1"
        BUDGET=4 BATCHES="1" FIG2_METHODS="adamw gn_full" ;;   # (Figure 2's loop at two of its methods)
      *) echo "run.sh full: SIZE must be 150m, 45m or tiny (got $size)" >&2; exit 2 ;;
    esac
    swept=${LRS:-}
    [ -z "${PAPER_LRS:-}" ] || { LRS=$(paper_lrs); what="$what, at the scripts' $size lrs (PAPER_LRS=1: no sweeps)"; }
    if [ -n "$dry" ]; then
      plan
      echo "run.sh full at $size: $what. The plan (nothing was run):"; echo
      grep -v "^decision" "$plan_file" | cut -f1-3 > "$plan_file.runs"; $py bench.py --plan "$plan_file.runs"
      decisions
      # the other plan's cost beside it: every row swept, or every row at the scripts' lrs
      if [ -n "${PAPER_LRS:-}" ]; then other="every row swept" LRS=$swept; else other="PAPER_LRS=1" LRS=$(paper_lrs); fi
      : > "$plan_file"; plan
      grep -v "^decision" "$plan_file" | cut -f1-3 > "$plan_file.runs"
      echo; echo "The same at $size with $other: $($py bench.py --plan "$plan_file.runs" | sed -n 's/^| all | \([^|]*\) | \([^|]*\) |.*/\1 tokens, \2 H100-hours/p')"
      rm -f "$plan_file.runs"; exit
    fi
    echo "run.sh full at $size: $what (./run.sh full --dry-run lists its runs and their estimated cost)"
    time plan ;;
  reject)  # GN at a too-large inner lr from random init, with and without rejecting a step
    R="--size small --data ${DATA:-bbc} --lr 0.5 --schedule constant_with_inner_cosine --inner-steps 32"
    R="$R --ls-batches 2 --eval-every 1"
    run "$out/no_reject" gn_full.py $R --steps 3 --no-reject
    run "$out/with_rejection" gn_full.py $R --steps 5
    [ -z "$dry" ] || show_plan reject ;;
  gpu-check)
    gpu_check "${2:-results/gpu}"
    [ -z "$dry" ] || show_plan gpu-check ;;
  *)
    usage; exit 2 ;;
esac
