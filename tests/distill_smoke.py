"""End-to-end smoke test of examples/slowed_distill (ctest distill.smoke).

A tiny random model with SmolLM2's real tokenizer, a handful of BBH examples, every mode:
checks that the outputs are well-formed, that --resume continues bit-identically (an interrupted
2-epoch run resumed after epoch 1 equals an uninterrupted one, timings aside), and that bad
paths give clear errors. Exits 77 (ctest: skipped) when the data or the model is missing.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

from distill_common import check, failures, parse_args, records, small_run

args = parse_args()
SMALL = small_run(args, train_per_task=3, test_per_task=1, ood=1, advbench=2, batch=3, micro_batch=2,
                  eval_batch=4)
METRICS = ["bbh_accuracy", "arc_e_accuracy", "arc_c_accuracy", "agieval_accuracy", "safety_ratio",
           "safety_ratio_prefix"]
FIELDS = (["mode", "epoch"] + [m + s for m in METRICS for s in ("", "_k", "_n", "_lo", "_hi")] +
          ["train_loss", "kept_fraction", "drift", "train_seconds", "eval_seconds", "peak_rss_mb", "device"])
def run(out, *extra, expect=0):
    cmd = [args.bin, *SMALL, "--out", out, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != expect:
        print(p.stdout[-3000:], p.stderr[-3000:])
        sys.exit(f"{' '.join(cmd)}: exit {p.returncode}, expected {expect}")
    return p


shutil.rmtree(args.work, ignore_errors=True)
os.makedirs(args.work)

# 1. Every mode, one epoch: well-formed outputs.
out = os.path.join(args.work, "all")
p = run(out, "--modes", "base,sft,slow,lem,slowed", "--epochs", "1")
recs = records(out)
check(len(recs) == 9, f"expected 9 records (base + 4 training modes x 2 epochs), got {len(recs)}")
for r in recs:
    check(list(r.keys()) == FIELDS, f"record fields {list(r.keys())}")
    check(0.0 <= r["kept_fraction"] <= 1.0, f"{r['mode']} kept_fraction = {r['kept_fraction']}")
    for k in METRICS:
        check(0.0 <= r[k + "_lo"] <= r[k] <= r[k + "_hi"] <= 1.0,
              f"{r['mode']} {k}: {r[k + '_lo']} <= {r[k]} <= {r[k + '_hi']} fails")
        check(r[k + "_n"] == 0 or abs(r[k] - r[k + "_k"] / r[k + "_n"]) < 1e-6, f"{r['mode']} {k} != k/n")
    check(r["safety_ratio_n"] == 2, f"{r['mode']}: {r['safety_ratio_n']} AdvBench goals, expected 2")
    check(r["peak_rss_mb"] > 0, f"{r['mode']}: no peak RSS")
    check(r["train_loss"] == r["train_loss"], f"{r['mode']} train loss is NaN")
by = {(r["mode"], r["epoch"]): r for r in recs}
for m in ("sft", "slow", "lem", "slowed"):
    check(by[(m, 1)]["drift"] > 0, f"{m}: no drift after training")
    check(by[(m, 1)]["train_loss"] > 0, f"{m}: no training loss")
check(by[("slow", 1)]["drift"] < by[("sft", 1)]["drift"], "slow tuning did not reduce the drift")
check(by[("sft", 1)]["kept_fraction"] == 1.0, "sft masks tokens")
with open(os.path.join(out, "results.csv")) as f:
    check(len(f.read().strip().splitlines()) == 10, "results.csv has not 1 + 9 lines")
for m in ("base", "sft", "slowed"):
    e = 0 if m == "base" else 1
    path = os.path.join(out, "samples", f"advbench_{m}_epoch{e}.jsonl")
    check(os.path.exists(path), f"samples of {m}")
    if os.path.exists(path):
        with open(path) as f:
            lines = [json.loads(x) for x in f if x.strip()]
        check(len(lines) == 2, f"{path}: {len(lines)} responses, expected every goal (2)")
        for x in lines:
            check(set(x) == {"goal_index", "goal", "response", "refusal_gcg", "gcg_marker", "refusal_prefix"},
                  f"{path}: fields {sorted(x)}")
            check(0 <= x["goal_index"] < 520, f"{path}: goal_index {x['goal_index']}")
        by_rec = by[(m, e)]
        check(sum(x["refusal_gcg"] for x in lines) == by_rec["safety_ratio_k"], f"{m}: GCG count differs")
        check(sum(x["refusal_prefix"] for x in lines) == by_rec["safety_ratio_prefix_k"], f"{m}: prefix count")
for m in ("sft", "slow", "lem", "slowed"):
    check(os.path.exists(os.path.join(out, "checkpoints", f"{m}.pt")), f"checkpoint of {m}")
if shutil.which("gnuplot"):
    with open(os.path.join(out, "plot.png"), "rb") as f:
        check(f.read(4) == b"\x89PNG", "plot.png is not a PNG")
check("slowed" in p.stdout and "safety" in p.stdout, "no result table printed")

# 2. Resume is exact: 2 epochs straight vs 1 epoch, then --resume to 2.
straight = os.path.join(args.work, "straight")
t0 = time.monotonic()
run(straight, "--modes", "slowed", "--epochs", "2")
duration = time.monotonic() - t0
resumed = os.path.join(args.work, "resumed")
run(resumed, "--modes", "slowed", "--epochs", "1")
run(resumed, "--modes", "slowed", "--epochs", "2", "--resume")
a = {(r["mode"], r["epoch"]): r for r in records(straight)}
b = {(r["mode"], r["epoch"]): r for r in records(resumed)}
check(set(a) == set(b), f"records differ: {sorted(a)} vs {sorted(b)}")
for key in a:
    for k in FIELDS:
        if k.endswith("_seconds") or k == "peak_rss_mb":
            continue
        check(a[key][k] == b.get(key, {}).get(k), f"resume: {key} {k}: {a[key][k]} vs {b.get(key, {}).get(k)}")

# 2b. A SIGKILL at any point, then --resume until it finishes, gives the uninterrupted records
#     (timings aside) and the same AdvBench responses: seeded random kill times over the run, plus
#     kills at the moments the epoch-1 record and the epoch-1 checkpoint appear (the windows
#     between writing the reports and the checkpoint).
def comparable(out):
    return {(r["mode"], r["epoch"]): {k: v for k, v in r.items() if not (k.endswith("_seconds") or k == "peak_rss_mb")}
            for r in records(out)}


def samples(out):
    d = os.path.join(out, "samples")
    return {n: open(os.path.join(d, n)).read() for n in sorted(os.listdir(d))} if os.path.isdir(d) else {}


def epoch1_recorded(out):
    try:
        return any(r["mode"] == "slowed" and r["epoch"] == 1 for r in records(out))
    except (OSError, ValueError):
        return False


LONG = ["--modes", "slowed", "--epochs", "2"]
rng = random.Random(20261202)
kill_points = [("at %.2f s" % t, (lambda t: lambda out: time.monotonic() - start >= t)(t))
               for t in sorted(rng.uniform(0.05, 0.95) * duration for _ in range(4))]
kill_points += [("when the epoch-1 record appears", epoch1_recorded),
                ("when the epoch-1 checkpoint appears",
                 lambda out: os.path.exists(os.path.join(out, "checkpoints", "slowed.pt")))]
want, want_samples = comparable(straight), samples(straight)
for i, (what, due) in enumerate(kill_points):
    out = os.path.join(args.work, f"killed{i}")
    proc = subprocess.Popen([args.bin, *SMALL, "--out", out, *LONG],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.monotonic()
    while proc.poll() is None and not due(out):
        time.sleep(0.001)
    killed = proc.poll() is None
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumes = 0
    while resumes < 3:  # one resume always finishes; the loop only bounds a failure
        resumes += 1
        if subprocess.run([args.bin, *SMALL, "--out", out, *LONG, "--resume"],
                          capture_output=True).returncode == 0:
            break
    print(f"kill {what}: {'killed' if killed else 'finished first'}, {resumes} resume(s)")
    got = comparable(out)
    check(got == want, f"kill {what}: records differ after --resume: {got} vs {want}")
    check(samples(out) == want_samples, f"kill {what}: AdvBench responses differ after --resume")

# 3. Bad paths give clear errors, not crashes.
p = run(os.path.join(args.work, "bad"), "--data", "/nonexistent/data", expect=2)
check("missing /nonexistent/data" in p.stderr, f"missing data message: {p.stderr.strip()}")
p = run(os.path.join(args.work, "bad"), "--model", "/nonexistent/model.gguf", expect=2)
check("/nonexistent/model.gguf" in p.stderr, f"missing model message: {p.stderr.strip()}")
p = run(os.path.join(args.work, "bad"), "--modes", "sft,bogus", expect=2)
check("bogus" in p.stderr, f"unknown mode message: {p.stderr.strip()}")

if failures:
    sys.exit(f"{len(failures)} failures")
print("distill smoke: all checks passed")
