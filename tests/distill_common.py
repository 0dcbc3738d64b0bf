"""What the end-to-end tests of examples/slowed_distill share (distill_smoke.py, distill_dist.py):
the command line, the skip rule, the small run's flags, check() and the results reader."""
import argparse
import json
import os
import sys


def parse_args(*extra):
    """--bin, --data, --model, --work and the `extra` required flags; exits 77 (ctest: skipped)
    when the data folder or the model is missing."""
    ap = argparse.ArgumentParser()
    for flag in ("--bin", *extra, "--data", "--model", "--work"):
        ap.add_argument(flag, required=True)
    args = ap.parse_args()
    for path, what in ((args.data + "/bbh/tasks", "data folder"), (args.model, "SmolLM2 GGUF")):
        if not os.path.exists(path):
            print(f"skipped: {what} {path} missing")
            sys.exit(77)
    return args


def small_run(args, train_per_task, test_per_task, ood, advbench, batch, micro_batch, eval_batch):
    """The flags of a seconds-long run: the smoke model, two BBH tasks, 4-token generations."""
    return ["--smoke", "--quiet", "--data", args.data, "--model", args.model,
            "--tasks", "boolean_expressions,web_of_lies", "--train-per-task", str(train_per_task),
            "--test-per-task", str(test_per_task), "--ood", str(ood), "--advbench", str(advbench),
            "--max-new-tokens", "4", "--safety-new-tokens", "4", "--max-len", "320",
            "--batch", str(batch), "--micro-batch", str(micro_batch), "--eval-batch", str(eval_batch)]


failures = []


def check(cond, msg):
    if not cond:
        failures.append(msg)
        print("FAIL:", msg)


def records(out):
    with open(os.path.join(out, "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
