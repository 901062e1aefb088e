# Soak and chaos on the GPU machine (issue 21's goal): two nodes sharing cuda:0, SmolLM2-135M shape (random
# weights, bf16) with up to two instances, 256 HTTP streams of 128 tokens back to back for 6 minutes (their first
# requests spread over 2 s, so they do not move in lockstep), the node running the most requests SIGKILLed at
# 120 s, the controller at 240 s. No token check: bf16 batches are not deterministic (batch composition changes a
# near-tie); counts, failures with why, tokens per 10 s, memory and CUDA graphs are.
# Carry .whl (with aiohttp, or httpx, and the HTTP front end's stack) and .gpu (see setup.sh).
#   device run (from the repo root, about 8 minutes with setup): bash benchmarks/device/run_soak.sh
# Out: $OUT/soak_h200.tar.gz holding soak_h200.json (summary and raw record), soak_h200.png, soak.log (the bench's
# output) and cluster.log (every process of the cluster). What to look for, in soak.log's summary:
#   - "failed": 0, "cut": 0, "unfinished": 0 (the goal: no request lost to either kill);
#   - kills[0]: role node-N, requests_on_victim > 0 (the kill hit running streams), restarted_after_s,
#     back_to_90pct_after_s <= 30; kills[1]: role controller, back_to_90pct_after_s <= 30;
#   - "rss node-N" lines: settled spread within 10 % and the late half's slope near 0 MiB/min; where a node still
#     grows, the by-part slopes say which memory (RssAnon: its heap, CUDA's host state; RssFile/RssShmem: mapped
#     checkpoint or tier pages), and the "cuda graphs" lines whether its decode graphs were still being captured.
source benchmarks/device/setup.sh || exit 1
timeout 500 python3 benchmarks/bench_soak.py --device cuda:0 --model-source $SLLM_HOME/models/smollm2-135m \
  --gpu-memory 60GiB --dram 8GiB --kv-cache 8GiB --max-instances 2 --target-concurrency 128 --no-check \
  --streams ${STREAMS:-256} --duration ${DURATION:-360} --max-tokens 128 --drain 60 \
  --kill ${KILLS:-node@120,controller@240} --json $OUT/soak_h200.json --png $OUT/soak_h200.png 2>&1 \
  | grep -v "Loading weights" > $OUT/soak.log
tail -40 $OUT/soak.log
cp "$(ls -td /tmp/bench-soak-* | head -1)/cluster.log" $OUT/cluster.log 2>/dev/null  # the newest run's
cd $OUT && FILES=$(ls soak_h200.json soak_h200.png soak.log cluster.log 2>/dev/null; true) \
  && tar czf soak_h200.tar.gz $FILES && rm -f $FILES
ls -la $OUT
