# Where the first token goes on the GPU machine, in one call (about 4-6 minutes on a bare 1x H200): per-hop TTFT
# traces through the cluster at 1/32/256 streams, 3 runs each, transformers' generate at batch N as the in-run
# baseline (benchmarks/trace_ttft.py), then the engine's CUDA tests. Carry .whl and .gpu (see setup.sh).
#   device run: bash benchmarks/device/run_trace_ttft.sh
source benchmarks/device/setup.sh || exit 1
nproc; free -g | head -2
timeout 420 python3 benchmarks/trace_ttft.py --device cuda:0 --concurrency ${CONCURRENCY:-1,32,256} --runs ${RUNS:-3} \
  ${EXTRA:---generate} --json $OUT/trace_ttft.json 2>&1 | grep -v "Loading weights" | tee $OUT/trace_ttft.log
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py 2>&1 | tail -5
exit 0
