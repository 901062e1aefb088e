# The engine under load against issue 20's goals, in one call (about 7.5 minutes on a bare 1x H200): through the
# cluster at 1/32/256 streams, 3 runs each (median and spread), transformers' generate at batch 1/32/256 3 times
# as the in-run baseline, with per-hop TTFT traces (benchmarks/trace_ttft.py); then the A/B at 32/256 streams with
# prefill graphs off (SLLM_PREFILL_GRAPHS=0: new prompts' prefill steps eager, the default until this run has checked
# the graphs; the main run turns them on with SLLM_PREFILL_GRAPHS=1; AB_ENV sets
# another switch, e.g. SLLM_OUTPUT_THREAD=0); then the engine's CUDA tests. Everything lands in $OUT/goals.tar.gz
# (goals/: machine.txt, goals.{log,json} with graphs on, goals-ab.{log,json} with them off, tests.log).
# PROFILE=1 adds py-spy stacks (py-spy on PATH) of the first measured round at 1 and 32 streams, at the end.
# Knobs: RUNS (3), CONCURRENCY (1,32,256), AB_CONCURRENCY (32,256), AB_ENV, and each stage's limit GOALS_S (230),
# AB_S (120), TEST_S (100); short of time, RUNS=2.
#
# What to look for: per N, tok/s and TTFT p50/p99 (median of the runs, min..max) in goals.log against goals-ab.log
# at 32 and 256 streams (the same call, so same-run ratios), and the per-hop p50s `inst_in` (an arrival waiting
# for the running step) and `token_sampled` (its own prefill step): before prefill graphs an eager prefill step was
# ~30 ms of host time on the H200 and arrivals waited 69 ms behind it at 32 streams (RESULTS.md, issue 20). Issue
# 20's goals: TTFT p50 <= 50 ms / p99 <= 150 ms at 32 streams, p50 <= 150 ms at 256, >= 5x generate b32, >= 3x
# generate b256. tests.log: 8 passed (test_prefill_graphs_... checks capture, replay against eager, and the logits
# against the unpadded engine; the node logs "captured prefill graph (T, C, R)" for each shape).
# Carry .whl and .gpu (see setup.sh).
#   device run: bash benchmarks/device/run_engine_goals.sh
source benchmarks/device/setup.sh || exit 1
R=$OUT/goals; mkdir -p $R
(nproc; free -g | head -2; git log --oneline -1) | tee $R/machine.txt
T="python3 benchmarks/trace_ttft.py --device cuda:0 --runs ${RUNS:-3}"
timeout ${GOALS_S:-230} $T --concurrency ${CONCURRENCY:-1,32,256} --env SLLM_PREFILL_GRAPHS=1 --generate --json $R/goals.json 2>&1 \
  | grep -v "Loading weights" | tee $R/goals.log
timeout ${AB_S:-120} $T --concurrency ${AB_CONCURRENCY:-32,256} --env ${AB_ENV:-SLLM_PREFILL_GRAPHS=0} \
  --json $R/goals-ab.json 2>&1 | grep -v "Loading weights" | tee $R/goals-ab.log | tail -32
timeout ${TEST_S:-100} python3 -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py 2>&1 | tee $R/tests.log \
  | tail -15
[ -n "$PROFILE" ] && timeout 60 python3 benchmarks/trace_ttft.py --device cuda:0 --runs 1 --concurrency 1,32 \
  --profile $R/profile --json $R/profile.json 2>&1 | tail -3
tar czf $OUT/goals.tar.gz -C $OUT goals && rm -rf $R
exit 0
