# bash benchmarks/device/run_migration_and_demo.sh  (on the device machine; results under $OUT)
source benchmarks/device/setup.sh
L=64,256,1024,4096
B="python3 benchmarks/bench_migration.py --device cuda --lengths $L --reps 3 --long-reps 3 --skip-alternatives"
timeout 190 $B --transfer recompute --json $OUT/mig_gpu_recompute.json > $OUT/mig_gpu_recompute.log 2>&1; echo "recompute rc $?"
timeout 150 $B --transfer auto --json $OUT/mig_gpu_auto.json > $OUT/mig_gpu_auto.log 2>&1; echo "auto rc $?"
timeout 200 python3 demo/run_demo.py --device cuda > $OUT/demo_gpu.log 2>&1; echo "demo rc $?"
grep -h -A6 "where the switch gap goes" $OUT/mig*.log; grep -h " 4096 \| 1024 \|  256 \|    64 " $OUT/mig*.log | grep -v "L=" | head -20; tail -30 $OUT/demo_gpu.log
