"""Start srv.py, then for each phase 'kind:N' send N requests of that kind (concurrency C), then ask the server for CMDS."""
import asyncio, json, os, random, subprocess, sys, time
sys.path.insert(0, "/work/main/scripts"); sys.path.insert(0, "/work/main")
import grpc
import soak
from soak import Traffic, free_port, pb_grpc, v2_grpc

def main():
    phases = sys.argv[1].split(",")          # e.g. nan:2000,nan:2000
    cmds = os.environ.get("CMDS", "rss").split(",")
    conc = int(os.environ.get("CONC", "32"))
    port = free_port()
    env = dict(os.environ, PORT=str(port))
    srv = subprocess.Popen(["nice", "-n", "10", "/work/main/.venv/bin/python", os.path.join(os.path.dirname(os.path.abspath(__file__)), "srv.py")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    print(srv.stdout.readline().strip(), flush=True)
    def ask(cmd):
        srv.stdin.write(cmd + "\n"); srv.stdin.flush()
        return json.loads(srv.stdout.readline())
    for c in cmds: print("start", json.dumps(ask(c)), flush=True)
    traffic = Traffic(random.Random(0), 1 << 20)
    orig_make = traffic.make
    counter = [0]
    def make(kind):
        if kind == "sweep":   # n = 1..64 images in turn, steps 3
            counter[0] += 1
            n = (counter[0] - 1) % 64 + 1
            return "Purify", soak._v1(traffic.image(n), options=soak.pb.ProjectionOptions(steps=int(os.environ.get("SWEEP_STEPS", "3")))), None, None
        return orig_make(kind)
    traffic.make = make
    async def run_phase(kind, n):
        ch = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.max_send_message_length", 1 << 24), ("grpc.max_receive_message_length", 1 << 24)])
        stubs = {"Purify": pb_grpc.PurifierStub(ch), "ModelInfer": v2_grpc.GRPCInferenceServiceStub(ch)}
        rec = soak.Recorder(); sem = asyncio.Semaphore(conc); kinds = kind.split("+")
        async def go(i):
            async with sem:
                await soak.one(stubs, traffic, kinds[i % len(kinds)], float(os.environ.get("DEADLINE", "10")), rec)
        t = time.time()
        await asyncio.gather(*(go(i) for i in range(n)))
        await ch.close()
        return {k: len(v) for k, v in rec.latency.items()}, round(time.time() - t, 1)
    for ph in phases:
        kind, n = ph.rsplit(":", 1)
        codes, secs = asyncio.run(run_phase(kind, int(n)))
        print("phase", kind, n, secs, "s", {f"{k[0]}/{k[1]}": v for k, v in codes.items()}, flush=True)
        for c in cmds: print("  ", json.dumps(ask(c)), flush=True)
    ask("quit") if False else None
    srv.stdin.write("quit\n"); srv.stdin.flush(); srv.wait(30)

main()
