# The serving engine on the GPU machine: its CUDA tests, then bench_serving (SmolLM2-135M shape, random weights).
#   device run: bash benchmarks/device/run_engine.sh   (carry .whl and .gpu; see setup.sh)
source benchmarks/device/setup.sh || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py tests/test_batching.py 2>&1 | tail -15
timeout 420 python3 benchmarks/bench_serving.py --device cuda:0 --concurrency ${CONCURRENCY:-1,8,32,128,256} \
  --eager-at ${EAGER_AT:-1} --deterministic-at ${DETERMINISTIC_AT:-32} --json $OUT/serving.json 2>&1 \
  | grep -v "Loading weights" | tee $OUT/serving.log
