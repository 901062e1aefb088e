# The engine under load against issue 20's goals, in one call (about 7 minutes on a bare 1x H200): through the
# cluster at 1/32/256 streams, 3 runs each (median and spread), transformers' generate at batch 1/32/256 3 times
# as the in-run baseline, with per-hop TTFT traces (benchmarks/trace_ttft.py); then the A/B at 32/256 streams with
# prefill graphs off (SLLM_PREFILL_GRAPHS=0: new prompts' prefill steps eager, the path before them; AB_ENV sets
# another switch, e.g. SLLM_OUTPUT_THREAD=0); then the engine's CUDA tests. Everything lands in $OUT/goals.tar.gz.
# PROFILE=1 adds py-spy stacks (py-spy on PATH) of the first measured round at 1 and 32 streams, at the end.
# Carry .whl and .gpu (see setup.sh).
#   device run: bash benchmarks/device/run_engine_goals.sh
source benchmarks/device/setup.sh || exit 1
R=$OUT/goals; mkdir -p $R
(nproc; free -g | head -2; git log --oneline -1) | tee $R/machine.txt
T="python3 benchmarks/trace_ttft.py --device cuda:0 --runs ${RUNS:-3}"
timeout ${GOALS_S:-230} $T --concurrency ${CONCURRENCY:-1,32,256} --generate --json $R/goals.json 2>&1 \
  | grep -v "Loading weights" | tee $R/goals.log
timeout ${AB_S:-120} $T --concurrency ${AB_CONCURRENCY:-32,256} --env ${AB_ENV:-SLLM_PREFILL_GRAPHS=0} \
  --json $R/goals-ab.json 2>&1 | grep -v "Loading weights" | tee $R/goals-ab.log | tail -32
timeout ${TEST_S:-100} python3 -m pytest -q -p no:cacheprovider tests/test_engine_cuda.py 2>&1 | tee $R/tests.log \
  | tail -15
[ -n "$PROFILE" ] && timeout 60 python3 benchmarks/trace_ttft.py --device cuda:0 --runs 1 --concurrency 1,32 \
  --profile $R/profile --json $R/profile.json 2>&1 | tail -3
tar czf $OUT/goals.tar.gz -C $OUT goals && rm -rf $R
exit 0
