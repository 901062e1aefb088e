# The engine under load against issue 20's goals, in one call (about 7-9 minutes on a bare 1x H200): through the
# cluster at 1/32/256 streams, 3 runs each (median and spread), transformers' generate at batch 1/32/256 3 times
# as the in-run baseline, with per-hop TTFT traces (benchmarks/trace_ttft.py); then the same at 32/256 streams
# with the text made on the step thread (SLLM_OUTPUT_THREAD=0, what the output processor replaced), then the
# engine's CUDA tests. Carry .whl and .gpu (see setup.sh).
#   device run: bash benchmarks/device/run_engine_goals.sh
source benchmarks/device/setup.sh || exit 1
nproc; free -g | head -2
timeout 270 python3 benchmarks/trace_ttft.py --device cuda:0 --concurrency ${CONCURRENCY:-1,32,256} --runs ${RUNS:-3} \
  --generate --json $OUT/goals.json 2>&1 | grep -v "Loading weights" | tee $OUT/goals.log
timeout 170 python3 benchmarks/trace_ttft.py --device cuda:0 --concurrency ${AB_CONCURRENCY:-32,256} --runs ${RUNS:-3} \
  --env SLLM_OUTPUT_THREAD=0 --json $OUT/goals-inline.json 2>&1 | grep -v "Loading weights" | tee $OUT/goals-inline.log
timeout 90 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py 2>&1 | tail -5
exit 0
