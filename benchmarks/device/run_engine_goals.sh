# The engine under load against issue 20's goals, in one call (about 7-8 minutes on a bare 1x H200): through the
# cluster at 1/32/256 streams, 3 runs each (median and spread), transformers' generate at batch 1/32/256 3 times
# as the in-run baseline, with per-hop TTFT traces (benchmarks/trace_ttft.py); then two A/Bs at 32/256 streams:
# the text on the step thread (SLLM_OUTPUT_THREAD=0, what the output processor replaced) and a 4x prefill budget
# per step (SLLM_MAX_BATCHED_TOKENS=8192: fewer eager prefill steps for a burst); then the engine's CUDA tests.
# PROFILE=1 adds py-spy stacks (py-spy on PATH) of the first measured round at 1 and 32 streams, at the end.
# Carry .whl and .gpu (see setup.sh).
#   device run: bash benchmarks/device/run_engine_goals.sh
source benchmarks/device/setup.sh || exit 1
nproc; free -g | head -2
T="python3 benchmarks/trace_ttft.py --device cuda:0 --runs ${RUNS:-3}"
timeout 240 $T --concurrency ${CONCURRENCY:-1,32,256} --generate --json $OUT/goals.json 2>&1 \
  | grep -v "Loading weights" | tee $OUT/goals.log
timeout 110 $T --concurrency ${AB_CONCURRENCY:-32,256} --env SLLM_OUTPUT_THREAD=0 --json $OUT/goals-inline.json 2>&1 \
  | grep -v "Loading weights" | tail -32 | tee $OUT/goals-inline.log
timeout 110 $T --concurrency ${AB_CONCURRENCY:-32,256} --env SLLM_MAX_BATCHED_TOKENS=8192 --json $OUT/goals-8k.json 2>&1 \
  | grep -v "Loading weights" | tail -32 | tee $OUT/goals-8k.log
timeout 60 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py 2>&1 | tail -5
[ -n "$PROFILE" ] && timeout 60 python3 benchmarks/trace_ttft.py --device cuda:0 --runs 1 --concurrency 1,32 \
  --profile $OUT/profile --json $OUT/profile.json 2>&1 | tail -3
exit 0
