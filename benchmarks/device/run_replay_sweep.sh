# The paper's headline on the GPU machine in one call (issue 19): a model family several times the GPUs' memory,
# DRAM tiers smaller than it, bursty Gamma traffic at two CVs, 3 seeds, serverlessllm against random and the Ray
# Serve baseline (and rayserve-cache and kserve on one seed), paired by seed.
#
#   bash benchmarks/device/run_replay_sweep.sh          # device call; carry .whl and .gpu (see setup.sh)
#   SETUP=0 DEVICE=cpu PY=.venv/bin/python SCALE=tiny bash benchmarks/device/run_replay_sweep.sh   # smoke, a CPU VM
#
# LAYOUT=policies (default): each (CV, seed, policy) is one replay process with its own cluster; GROUP seeds'
# processes (default all: 3 seeds x 3 policies, 9 clusters of 2 nodes x 2 GPU budgets) run side by side on the one
# H200 and its 16 cores, phase after phase (a CV's groups, then the next CV's). A seed's policies replay its workload at the same time, so the machine's load is the
# same for each (the pairing is in time as well as in workload). LAYOUT=seeds (the first run): one process per
# (CV, seed) running its policies one after another, all side by side: a policy's place in the order was a phase
# of the machine's load, and that, not placement, made the first run's differences (RESULTS.md). With
# LAYOUT=policies each phase gets (TOTAL - setup - 60 s) / (number of phases): at TOTAL=360 with GROUP=3 (about
# 100 s a phase) CV 2's nine clusters decoded at 70-116 ms a token, too slowly to drain in time, and only
# rayserve's runs finished (run 2 of 2026-12-03). GROUP=1 PHASE=seed runs one seed's policies at both CVs at a
# time (6 clusters and rayserve-cache's on seed 0: 12-14 node processes, as many as run 1's 14, whose decode was
# 15-47 ms a token and whose runs all drained), 3 phases of about 110 s.
#
# The next call (issue 19, after the placement fixes of session 3: a move is weighed with the reload of the moved
# model, instances not worth moving are waited for, only as many leave as free the room), 9 minutes in all
# (run(timeout_s=560, carry=[".whl", ".gpu"])):
#
#   GROUP=1 PHASE=seed DURATION=45 TIMEOUT=35 EXTRA=rayserve-cache TOTAL=500 bash benchmarks/device/run_replay_sweep.sh
#
# What to look for: every one of the 18 (CV, seed, policy) runs (and rayserve-cache on CV 8 seed 0) has its JSON
# (summary.md's tables; none "interrupted" in the process tails); per seed, serverlessllm's ratio table against
# random and rayserve (mean, p50, p99) in merged_cv{2,8}.json's `paired`; in serverlessllm's events, the schedule
# decisions' `reload_s` and `drain`, and no burst where a model is loaded, moved and loaded again within seconds
# (run 2's CV 8 seed 2: five loads of one model in 3 s). kserve is left out: its cold start (a process start,
# 19 s under run 1's load) does not drain within a phase of this call. Each process has
# its own keys directory (the clusters' `sllm up` would otherwise race to create the same key files).
#
# Sizes (full scale): 16 models of 400-1000 MB (fp32, llama shape, random weights drawn on the GPU), 11.2 GB;
# each GPU budget 1.3 GB (4 per cluster: 5.2 GB, the family weighs 2.2x that); each node's DRAM tier 3.4 GB and SSD
# tier 4.5 GB (both less than the family); each checkpoint starts on one node's SSD (--ssd-seed 1, hard links);
# repository 1250 MB/s (10 Gbit/s), SSD reads 2000 MB/s; Gamma arrivals at 1.5 req/s over 60 s (Zipf over the
# models: at CV 2 a seed touches 10-13 models, at CV 8 4-5 in bursts of up to 80 requests), 8-32 tokens out;
# keep-alive 10 s; a request is given up 45 s after its arrival (counted at its time to failure). Disk: the family
# twice (ours and the baselines' safetensors) is 22.4 GB; each cluster's tiers live in its own temporary directory,
# removed when it stops.
# Everything comes back as one archive plus the summary and the merged JSON and plots per CV (8 files at most).
set -u
OUT=${OUT:-/tmp/sweep-out}
mkdir -p "$OUT"
t0=$(date +%s)
if [ "${SETUP:-1}" = 1 ]; then source benchmarks/device/setup.sh; fi
PY=${PY:-python3}
export SLLM_HOME=${SLLM_HOME:-/tmp/sllm}
if [ "${SCALE:-full}" = tiny ]; then   # the script's logic end to end on a CPU VM in a few minutes
  : "${MODELS:=4}" "${SIZES:=50,80}" "${GPU_MB:=110}" "${DRAM_MB:=100}" "${SSD_MB:=150}" "${DURATION:=10}"
  : "${RPS:=1.0}" "${SEEDS:=0}" "${CVS:=2 8}" "${TIMEOUT:=40}" "${GPUS_PER_NODE:=1}" "${INIT_DEVICE:=cpu}"
  : "${TOTAL:=900}"
fi
DEVICE=${DEVICE:-cuda}; INIT_DEVICE=${INIT_DEVICE:-$DEVICE}
MODELS=${MODELS:-16}; SIZES=${SIZES:-400,600,800,1000}
GPU_MB=${GPU_MB:-1300}; DRAM_MB=${DRAM_MB:-3400}; SSD_MB=${SSD_MB:-4500}
NODES=${NODES:-2}; GPUS_PER_NODE=${GPUS_PER_NODE:-2}
DURATION=${DURATION:-60}; RPS=${RPS:-1.5}; TIMEOUT=${TIMEOUT:-45}
SEEDS=${SEEDS:-0 1 2}; CVS=${CVS:-2 8}
POLICIES=${POLICIES:-serverlessllm,random,rayserve}; EXTRA=${EXTRA-rayserve-cache,kserve}   # EXTRA= : none
LAYOUT=${LAYOUT:-policies}   # policies: a seed's policies side by side (paired in time); seeds: policies in turn
TOTAL=${TOTAL:-510}   # the whole call's seconds, setup included (a device call is cut at 600)
FAMILY=$SLLM_HOME/family-sweep
COMMON=(--device "$DEVICE" --nodes "$NODES" --gpus-per-node "$GPUS_PER_NODE" --models "$MODELS" --sizes "$SIZES"
        --gpu-memory "$GPU_MB" --dram "$DRAM_MB" --ssd "$SSD_MB" --ssd-seed 1 --rps "$RPS" --duration "$DURATION"
        --timeout "$TIMEOUT" --family-dir "$FAMILY" --trace gamma)
RUN=/tmp/sweep-run; rm -rf "$RUN"; mkdir -p "$RUN"
df -h /tmp | tail -1; free -g | head -2; nproc
echo "== family: $MODELS models of $SIZES MB, drawn on $INIT_DEVICE"
$PY -m sllm_eval.replay "${COMMON[@]}" --cv 2 --policy "$POLICIES${EXTRA:+,$EXTRA}" --init-device "$INIT_DEVICE" \
  --prepare-only > "$RUN/prepare.log" 2>&1; rc=$?; tail -20 "$RUN/prepare.log"; [ $rc = 0 ] || exit 1
du -sh "$FAMILY" "$FAMILY/safetensors" 2>/dev/null; df -h /tmp | tail -1
echo "== family ready at $(( $(date +%s) - t0 ))s; replays side by side, $DURATION s of arrivals each"
# The replays get what is left of TOTAL but the merge's minute. A process still running then is sent SIGTERM: it stops
# the cluster in hand and keeps the JSON of the policies it finished (written after each one).
DEADLINE=${DEADLINE:-$(( TOTAL - ($(date +%s) - t0) - 60 ))}
[ "$DEADLINE" -lt 30 ] && DEADLINE=30   # timeout 0 would mean none
echo "== replays get ${DEADLINE}s, layout $LAYOUT"
first_cv=${CVS##* }; first_seed=${SEEDS%% *}
launch() {   # tag, deadline, replay arguments...
  local tag=$1 limit=$2; shift 2
  SLLM_KEYS=$RUN/keys-$tag timeout -k 40 "$limit" $PY -m sllm_eval.replay "${COMMON[@]}" "$@" \
    --json "$RUN/$tag.json" > "$RUN/$tag.log" 2>&1 &
  pids+=($!)
}
pids=()
if [ "$LAYOUT" = seeds ]; then
  # One process per (CV, seed), its policies one after another: every process starts its first policy at the same
  # moment, so a policy's position in the order is a phase of the machine's load (the first run of 2026-12-03
  # showed decode 1.3-1.6x slower in the first phase than in the second, on every seed).
  for cv in $CVS; do for s in $SEEDS; do
    launch "cv${cv}_s$s" "$DEADLINE" --cv "$cv" --policy "$POLICIES" --seeds "$s" --png "$RUN/cv${cv}_s$s.png"
  done; done
  [ -n "$EXTRA" ] && launch "cv${first_cv}_s${first_seed}_extra" "$DEADLINE" --cv "$first_cv" --policy "$EXTRA" --seeds "$first_seed"
  for p in "${pids[@]}"; do wait "$p"; done
else
  # One process per (seed, policy); GROUP seeds' processes side by side in a phase (default: all of a CV's), the
  # phases one after another: a seed's policies replay its workload at the same time on the same machine, so
  # whatever load the machine is under, they share it. PHASE=cv (default): a phase is one CV's group of seeds;
  # PHASE=seed: a phase is a group of seeds at every CV at once. Each phase gets an equal share of the time left.
  nseeds=$(echo $SEEDS | wc -w); GROUP=${GROUP:-$nseeds}; PHASE=${PHASE:-cv}
  groups=(); set -- $SEEDS
  while [ $# -gt 0 ]; do
    group=""; k=0
    while [ $# -gt 0 ] && [ $k -lt "$GROUP" ]; do group="$group $1"; shift; k=$(( k + 1 )); done
    groups+=("$group")
  done
  phase_list=()
  if [ "$PHASE" = seed ]; then
    for g in "${groups[@]}"; do phase_list+=("$CVS|$g"); done
  else
    for cv in $CVS; do for g in "${groups[@]}"; do phase_list+=("$cv|$g"); done; done
  fi
  phases=${#phase_list[@]}
  for ph in "${phase_list[@]}"; do
    cvs=${ph%%|*}; group=${ph#*|}
    limit=$(( (TOTAL - ($(date +%s) - t0) - 60) / phases )); phases=$(( phases - 1 ))
    [ "$limit" -lt 30 ] && limit=30   # timeout 0 would mean none
    echo "== CV $cvs, seeds$group: ${POLICIES//,/ } side by side, ${limit}s (at $(( $(date +%s) - t0 ))s)"
    pids=()
    for cv in $cvs; do
      for s in $group; do for p in ${POLICIES//,/ }; do
        launch "cv${cv}_s${s}_$p" "$limit" --cv "$cv" --policy "$p" --seeds "$s"
      done; done
      case "$group " in
        *" $first_seed "*) if [ -n "$EXTRA" ] && [ "$cv" = "$first_cv" ]; then for p in ${EXTRA//,/ }; do
          launch "cv${cv}_s${first_seed}_$p" "$limit" --cv "$cv" --policy "$p" --seeds "$first_seed"; done; fi ;;
      esac
    done
    for p in "${pids[@]}"; do wait "$p"; done
  done
fi
echo "== replays done at $(( $(date +%s) - t0 ))s"; df -h /tmp | tail -1
{
  echo "# Replay sweep, $(date -u +%FT%TZ)"
  echo; echo "device $DEVICE, $NODES nodes x $GPUS_PER_NODE GPU budgets of $GPU_MB MB, DRAM $DRAM_MB MB and SSD $SSD_MB MB per node,"
  echo "$MODELS models of $SIZES MB, Gamma rps $RPS, $DURATION s of arrivals, timeout $TIMEOUT s, CVs $CVS, seeds $SEEDS"
  echo "policies $POLICIES; extra $EXTRA on seed $first_seed CV $first_cv; layout $LAYOUT (seeds: one process per (CV, seed),"
  echo "policies in turn; policies: one process per (seed, policy), a CV's side by side, CVs in turn)"
  for cv in $CVS; do
    files=""
    for f in "$RUN"/cv${cv}_s*.json; do [ -s "$f" ] && files="$files,$f"; done
    files=${files#,}
    echo; echo "## CV $cv (${files//$RUN\//})"; echo; echo '```'
    [ -n "$files" ] && $PY -m sllm_eval.replay --merge "$files" --json "$OUT/merged_cv$cv.json" --png "$OUT/merged_cv$cv.png" 2>&1
    echo '```'
  done
  echo; echo "## process tails"
  for f in "$RUN"/*.log; do echo; echo "### $(basename "$f")"; echo '```'; tail -8 "$f"; echo '```'; done
} > "$OUT/summary.md"
tar -czf "$OUT/sweep.tar.gz" -C "$RUN" --exclude='keys-*' .
echo "== all done at $(( $(date +%s) - t0 ))s"
cat "$OUT/summary.md" | head -150
exit 0
