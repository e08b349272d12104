"""Server under test, controlled by stdin lines: rss | trim | snap | gc | quit. Prints JSON lines."""
import asyncio, ctypes, gc, json, os, sys, threading, time, tracemalloc, collections
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, "/work/main")
TRACE = os.environ.get("TRACE") == "1"
if TRACE:
    tracemalloc.start(int(os.environ.get("TRACE_DEPTH", "12")))
from purifier.server import Server, logs
from purifier.settings import ServeSettings
libc = ctypes.CDLL("libc.so.6")
if "TRIM_EVERY_S" in os.environ:
    from purifier.engine import Engine
    _orig, _last, _every = Engine.project, [0.0], float(os.environ["TRIM_EVERY_S"])
    def project(self, *a, **k):
        try:
            return _orig(self, *a, **k)
        finally:
            if time.monotonic() - _last[0] >= _every:
                libc.malloc_trim(0); _last[0] = time.monotonic()
    Engine.project = project

def rss():
    for l in open(f"/proc/{os.getpid()}/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) / 1024

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = MallInfo2

def mall():
    m = libc.mallinfo2()
    return {"arena_mb": round(m.arena/2**20,1), "hblkhd_mb": round(m.hblkhd/2**20,1), "used_mb": round(m.uordblks/2**20,1), "free_mb": round(m.fordblks/2**20,1)}

prev_snap = None
peak = [0.0]
def sampler():
    while True:
        peak[0] = max(peak[0], rss()); time.sleep(0.1)
threading.Thread(target=sampler, daemon=True).start()
prev_types = None
def handle(cmd):
    global prev_snap, prev_types
    out = {"cmd": cmd, "cpu": round(sum(os.times()[:2]), 1), "rss": rss(), "peak": peak[0], "threads": threading.active_count(), **mall()}
    if cmd == "trim":
        libc.malloc_trim(0); out["rss_after_trim"] = rss(); out.update({"after_" + k: v for k, v in mall().items()})
    elif cmd == "snap" and TRACE:
        gc.collect()
        s = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        out["traced_mb"] = round(sum(st.size for st in s.statistics("filename")) / 2**20, 2)
        if prev_snap is not None:
            top = s.compare_to(prev_snap, "traceback")[:int(os.environ.get("TOPN", "8"))]
            out["top"] = [{"kb": round(t.size_diff/1024, 1), "n": t.count_diff, "tb": [f"{f.filename.replace('/work/main/.venv/lib/python3','')}:{f.lineno}" for f in t.traceback][-8:]} for t in top]
        prev_snap = s
    elif cmd == "gc":
        gc.collect()
        c = collections.Counter(type(o).__name__ for o in gc.get_objects())
        out["objects"] = sum(c.values())
        if prev_types is not None:
            out["diff"] = sorted(((k, c[k] - prev_types.get(k, 0)) for k in set(c) | set(prev_types) if c[k] != prev_types.get(k, 0)), key=lambda kv: -abs(kv[1]))[:15]
        prev_types = c
    peak[0] = 0.0
    print(json.dumps(out), flush=True)

async def main():
    kw = json.loads(os.environ.get("SETTINGS", "{}"))
    s = ServeSettings(model_dir="/work/main/models/fashion-mnist", host="127.0.0.1", grpc_port=int(os.environ["PORT"]), metrics_port=-1,
                      downstream="none", max_message_bytes=1 << 20, log_level="warning", **kw)
    logs.configure("warning")
    server = Server(s)
    await server.start()
    print(json.dumps({"ready": True, "rss": rss()}), flush=True)
    loop = asyncio.get_running_loop()
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).strip()
        if not line or line == "quit":
            break
        handle(line)
    await server.stop(grace=0)
    os._exit(0)

asyncio.run(main())
