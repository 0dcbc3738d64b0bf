"""Data-parallel runs of examples/slowed_distill on Gloo over loopback (ctest distill.dist).

One process, 2 ranks launched by hand, 2 ranks under torchrun --no-python and 4 ranks by hand
train the same global batches: their training loss, kept fraction and drift agree to fp32
tolerance and their evaluation counts and AdvBench samples are equal. Then the failure contract:
a killed rank makes its peer exit with an error within the timeout, and bad rank variables,
mismatched WORLD_SIZE or options are errors, never hangs.
"""
import os
import signal
import socket
import subprocess
import sys
import time

from distill_common import check, failures, parse_args, records, small_run

args = parse_args("--python")
SMALL = small_run(args, train_per_task=4, test_per_task=2, ood=2, advbench=5, batch=4, micro_batch=1,
                  eval_batch=2) + ["--modes", "base,slowed", "--no-checkpoints", "--dist-timeout", "20"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank, world, port, **extra):
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    env.update({k: str(v) for k, v in extra.items()})
    return env


def launch(out, world, *extra, envs=None, port=None):
    port = port or free_port()
    procs = []
    for r in range(world):
        env = envs[r] if envs else rank_env(r, world, port)
        procs.append(subprocess.Popen([args.bin, *SMALL, "--out", out, *extra], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def wait_all(procs, limit):
    deadline = time.time() + limit
    outs = []
    for p in procs:
        try:
            o, e = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            o, e = p.communicate()
            e += "\n<killed by the test: hung>"
        outs.append((p.returncode, o, e))
    return outs


def same_run(a, b, what):
    ra, rb = records(a), records(b)
    check(len(ra) == len(rb), f"{what}: {len(rb)} records, expected {len(ra)}")
    for x, y in zip(ra, rb):
        tag = f"{what} {x['mode']} e{x['epoch']}"
        for k in ("train_loss", "kept_fraction", "drift"):
            check(abs(x[k] - y[k]) <= 1e-5 * max(1.0, abs(x[k])), f"{tag}: {k} {y[k]} vs {x[k]} (one process)")
        for k in x:
            if k.endswith("_k") or k.endswith("_n"):
                check(x[k] == y[k], f"{tag}: {k} {y[k]} vs {x[k]} (one process)")
    for name in sorted(os.listdir(os.path.join(a, "samples"))):
        with open(os.path.join(a, "samples", name)) as f, open(os.path.join(b, "samples", name)) as g:
            check(f.read() == g.read(), f"{what}: samples/{name} differs from one process's")


os.makedirs(args.work, exist_ok=True)
one = os.path.join(args.work, "one")
p = subprocess.run([args.bin, *SMALL, "--out", one], capture_output=True, text=True)
if p.returncode != 0:
    sys.exit(f"one process: exit {p.returncode}\n{p.stderr[-3000:]}")

# 2 and 4 ranks by hand.
for world in (2, 4):
    out = os.path.join(args.work, f"hand{world}")
    res = wait_all(launch(out, world), 300)
    for r, (rc, o, e) in enumerate(res):
        check(rc == 0, f"{world} ranks by hand: rank {r} exit {rc}\n{e[-2000:]}")
    if all(rc == 0 for rc, _, _ in res):
        same_run(one, out, f"{world} ranks by hand")
        check(not os.path.exists(os.path.join(out, "results.jsonl.tmp")), "leftover temporary report")

# 2 ranks under torchrun (its agent hosts the store; the workers connect to it).
out = os.path.join(args.work, "torchrun2")
p = subprocess.run([args.python, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--no-python",
                    "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                    args.bin, *SMALL, "--out", out], capture_output=True, text=True, timeout=300)
check(p.returncode == 0, f"torchrun: exit {p.returncode}\n{p.stderr[-3000:]}")
if p.returncode == 0:
    same_run(one, out, "torchrun 2 ranks")

# A rank killed during training: its peer fails within the timeout (20 s) with a clear error.
# Far more epochs than the test waits for: the kill lands in training however fast the machine.
LONG = ["--train-per-task", "12", "--modes", "slowed", "--epochs", "1000"]
procs = launch(os.path.join(args.work, "killed"), 2, *LONG)
started = time.time()
for line in procs[0].stderr:  # rank 0's log: kill rank 1 once training has begun
    if "trains on" in line or time.time() - started > 120:
        break
time.sleep(1)
procs[1].send_signal(signal.SIGKILL)
t0 = time.time()
(rc0, _, e0), _ = wait_all(procs, 90)
check(rc0 != 0, "killed peer: rank 0 exit 0, expected an error")
check(time.time() - t0 < 60, f"killed peer: rank 0 took {time.time() - t0:.0f} s to fail")
check("<killed by the test: hung>" not in e0, "killed peer: rank 0 hung")
check("rank" in e0 and ("failed" in e0 or "closed" in e0 or "timed out" in e0.lower()),
      f"killed peer: rank 0's error does not say what happened:\n{e0[-1500:]}")

# Bad rank variables: an error naming the variable, at once.
bad = os.path.join(args.work, "bad")
for env, needle in ((dict(RANK="2"), "RANK: expected an integer in [0, 1]"),
                    (dict(RANK="x"), "RANK: expected an integer"),
                    (dict(MASTER_ADDR=""), "MASTER_ADDR"),
                    (dict(WORLD_SIZE="0"), "WORLD_SIZE: expected an integer in [1,")):
    e = rank_env(0, 2, free_port())
    e.update(env)
    p = subprocess.run([args.bin, *SMALL, "--out", bad], env=e, capture_output=True, text=True, timeout=60)
    check(p.returncode == 2 and needle in p.stderr, f"{env}: exit {p.returncode}, stderr {p.stderr[-500:]}")

# A dead rendezvous: rank 0 of 2 alone fails after --dist-timeout (5 s here), not hangs.
t0 = time.time()
e = rank_env(0, 2, free_port())
p = subprocess.run([args.bin, *SMALL, "--out", bad, "--dist-timeout", "5"], env=e, capture_output=True,
                   text=True, timeout=120)
check(p.returncode == 2 and time.time() - t0 < 60,
      f"rank 0 alone: exit {p.returncode} after {time.time() - t0:.0f} s\n{p.stderr[-800:]}")

# Mismatched WORLD_SIZE (rank 1 believes in 3 ranks) and mismatched options: errors on every
# rank within the timeout, not hangs.
port = free_port()
res = wait_all(launch(bad, 2, envs=[rank_env(0, 2, port), rank_env(1, 3, port)], port=port), 120)
for r, (rc, _, e) in enumerate(res):
    check(rc != 0 and "hung" not in e, f"mismatched WORLD_SIZE: rank {r} exit {rc}\n{e[-800:]}")
port = free_port()
procs = [subprocess.Popen([args.bin, *SMALL, "--out", bad, "--batch", str(4 + r)], env=rank_env(r, 2, port),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
for r, (rc, _, e) in enumerate(wait_all(procs, 120)):
    check(rc == 2 and "same --batch" in e, f"mismatched --batch: rank {r} exit {rc}\n{e[-800:]}")

if failures:
    sys.exit(f"{len(failures)} check(s) failed")
print("distill dist: all checks passed")
