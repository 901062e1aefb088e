# Soak and chaos on the GPU machine (issue 21's goal): two nodes sharing cuda:0, SmolLM2-135M shape (random
# weights, bf16) with up to two instances, 256 HTTP streams of 128 tokens back to back for 6 minutes, the node
# running the most requests SIGKILLed at 120 s, the controller at 240 s. No token check: bf16 batches are not
# deterministic (batch composition changes a near-tie); counts, failures with why, tokens per 10 s and memory are.
# Carry .whl (with aiohttp, or httpx, and the HTTP front end's stack) and .gpu (see setup.sh).
#   device run: bash benchmarks/device/run_soak.sh
source benchmarks/device/setup.sh || exit 1
timeout 560 python3 benchmarks/bench_soak.py --device cuda:0 --model-source $SLLM_HOME/models/smollm2-135m \
  --gpu-memory 60GiB --dram 8GiB --kv-cache 8GiB --max-instances 2 --target-concurrency 128 --no-check \
  --streams ${STREAMS:-256} --duration ${DURATION:-360} --max-tokens 128 --drain 60 \
  --kill ${KILLS:-node@120,controller@240} --json $OUT/soak_h200.json --png $OUT/soak_h200.png 2>&1 \
  | grep -v "Loading weights" | tail -60
