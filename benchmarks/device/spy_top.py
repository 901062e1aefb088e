"""Summarise py-spy raw stacks (``--threads``): per thread, the frames with the most self time and the most
inclusive time. ``python benchmarks/device/spy_top.py FILE...``"""

import collections
import sys

for path in sys.argv[1:]:
    by_thread: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    incl: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    totals: collections.Counter = collections.Counter()
    for line in open(path):
        stack, _, n = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        thread = frames[0][:60]
        totals[thread] += int(n)
        by_thread[thread][frames[-1][:110]] += int(n)
        for f in set(frames[1:]):
            incl[thread][f[:110]] += int(n)
    print(f"==== {path}")
    for thread, total in totals.most_common(4):
        print(f"-- {thread}: {total} samples")
        for frame, n in by_thread[thread].most_common(12):
            print(f"   self {100 * n / total:5.1f}% {frame}")
        for frame, n in incl[thread].most_common(14):
            print(f"   incl {100 * n / total:5.1f}% {frame}")
