# The serving engine on the GPU machine, in one call: its CUDA tests, bench_serving (SmolLM2-135M shape, random
# weights) at 1/8/32/128/256 streams against transformers' generate, deterministic mode's cost, then an 8B
# Llama-shape model at one stream against the HBM bound. Carry .whl and .gpu (see setup.sh).
#   device run: bash benchmarks/device/run_engine.sh
source benchmarks/device/setup.sh || exit 1
timeout 100 python3 -m pytest -q -x -p no:cacheprovider tests/test_engine_cuda.py 2>&1 | tail -5
timeout 330 python3 benchmarks/bench_serving.py --device cuda:0 --concurrency ${CONCURRENCY:-1,8,32,128,256} \
  --deterministic-at ${DETERMINISTIC_AT:-32} ${EXTRA:-} --json $OUT/serving.json 2>&1 | grep -v "Loading weights"
timeout 170 python3 benchmarks/bench_serving.py --device cuda:0 --llama8b /tmp/llama8b --json $OUT/llama8b.json 2>&1 \
  | grep -v "Loading weights"
rm -rf /tmp/llama8b /tmp/bench-serving-*   # room on the disk for the cold-start run that may follow
