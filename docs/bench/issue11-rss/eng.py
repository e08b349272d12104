import os, sys, time, ctypes, random
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/tmp/leak")
import torch
if os.environ.get('NOMKLDNN'): torch.backends.mkldnn.enabled = False
from purifier.engine import Engine
libc = ctypes.CDLL("libc.so.6")
class MI(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MI
def st():
    r = [int(l.split()[1])//1024 for l in open(f"/proc/{os.getpid()}/status") if l.startswith("VmRSS")][0]
    m = libc.mallinfo2(); return f"rss {r} used {m.uordblks/2**20:.1f} mmap {m.hblkhd/2**20:.1f} free {m.fordblks/2**20:.1f}"
e = Engine.load("/work/main/models/fashion-mnist", "cpu", os.environ.get("PRESET", "fast")); e.warm_up()
print("warm", st(), flush=True)
sizes = [int(s) for s in sys.argv[1].split(",")] if len(sys.argv) > 1 else list(range(1, 65))
cfg = e.config(**({"steps": int(os.environ["STEPS"])} if "STEPS" in os.environ else {}))
t = time.time()
for rnd in range(int(os.environ.get("ROUNDS", "2"))):
    tr = time.time(); cpu = time.process_time()
    for i, n in enumerate(sizes):
        e.project(torch.rand(n, 1, 28, 28), cfg)
        if os.environ.get('TRIM') == '1': libc.malloc_trim(0)
        if (i + 1) % 16 == 0:
            print(rnd, i + 1, n, st(), round(time.time() - t, 1), flush=True)
            if os.environ.get('TRIM') == '2': libc.malloc_trim(0); print('   trimmed', st(), flush=True)
    print('round', rnd, 'wall', round(time.time() - tr, 1), 'cpu', round(time.process_time() - cpu, 1), st(), flush=True)
for k in range(3):
    t0 = time.perf_counter(); libc.malloc_trim(0); print("trim took ms", round(1000 * (time.perf_counter() - t0), 2), st(), flush=True)
    e.project(torch.rand(64, 1, 28, 28), cfg); e.project(torch.rand(37, 1, 28, 28), cfg)
