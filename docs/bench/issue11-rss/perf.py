import os, sys, time
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, "/work/main")
import torch
from purifier.engine import Engine
e = Engine.load("/work/main/models/fashion-mnist", "cpu", "fast"); e.warm_up()
cfg = e.config()
sizes = [1, 4, 2, 1, 4, 16, 1, 8, 12, 3]
g = torch.Generator().manual_seed(0)
for n in sizes: e.project(torch.rand(n, 1, 28, 28, generator=g), cfg)   # see every shape once
res = []
for r in range(3):
    t, c = time.perf_counter(), time.process_time()
    for n in sizes: e.project(torch.rand(n, 1, 28, 28, generator=g), cfg)
    res.append((round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)))
rss = [int(l.split()[1])//1024 for l in open(f"/proc/{os.getpid()}/status") if l.startswith("VmRSS")][0]
print(os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default"), cfg, "rounds (wall, cpu):", res, "rss", rss, flush=True)
