#!/usr/bin/env python3
"""Golden trajectories of Slow Tuning on PyTorch's Python optimizers, read by tests/test_optim.cpp.

The peer is torch.optim (Python). Slow Tuning is implemented here a second time, independently of
the C++ headers, from its definition (include/slowed/optim/slow_tuning_options.h): after the base
optimizer's step, per parameter tensor,
  1. delta = theta_base_step - theta_prev;  delta *= s(t)
  2. if max_relative_step r:  ||delta|| <= r * max(||theta_prev||, norm_floor)   (scale down only)
  3. theta = theta_prev + delta
  4. if max_relative_drift R: project theta onto the ball
       ||theta - theta_0|| <= R * max(||theta_0||, norm_floor)
A bound whose radius is 0 does not apply. s = 1 with no step bound leaves the base step as is.
s(t) is `scale`, or hold_then_ramp(hold, ramp, final): scale for t < hold, then
scale + (final - scale) * (t - hold + 1) / ramp until the ramp is done, then final.

Every case uses float64 parameters and explicit per-step gradients (written to the file), so the
C++ test sets p.grad() from the file and compares trajectories tightly.

Usage (from the repository root):
    ~/.cache/slowed/venv/bin/python tests/golden/gen_optim_golden.py
writes tests/golden/optim_trajectories.txt, beside this script (override with --out).

File format: one record per line, whitespace-separated tokens, '#' lines are comments.
    format 1
    case <name>
    optimizer <sgd|adam|adamw|rmsprop|adagrad>
    hyper <key> <value> ...              every hyper-parameter, bools as 0/1
    slow <key> <value> ...               scale, max_relative_step, max_relative_drift, norm_floor,
                                         hold_steps, ramp_steps, final_scale ("none" = unset)
    groups <n>
    group <g> lr <lr>                    one per group, params listed by their index
    param <i> group <g> shape <ndim> <d0> ...
    steps <k>
    init <i> <values...>                 initial values, row-major
    grad <t> <i> <values...>             gradient of parameter i at step t
    after <t> <i> <values...>            parameter i after step t
    end
Floats are written with repr() (shortest round-trip decimal), so strtod reads them exactly.
"""

import argparse
import math
import os
import sys

import torch

NUM_STEPS = 6
SHAPES = [(3, 4), (4,)]  # a weight matrix and a bias


def scale_at(t, slow):
    hold = slow["hold_steps"]
    if hold is None or t < hold:
        return slow["scale"]
    into = t - hold + 1
    if into >= slow["ramp_steps"]:
        return slow["final_scale"]
    return slow["scale"] + (slow["final_scale"] - slow["scale"]) * into / slow["ramp_steps"]


def norm(t):
    return torch.linalg.vector_norm(t).item()


def make_optimizer(kind, hyper, groups):
    """groups: list of (params, lr)."""
    pg = [{"params": ps, "lr": lr} for ps, lr in groups]
    h = hyper
    if kind == "sgd":
        return torch.optim.SGD(pg, lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
                               nesterov=bool(h["nesterov"]), weight_decay=h["weight_decay"],
                               foreach=False)
    if kind in ("adam", "adamw"):
        cls = torch.optim.Adam if kind == "adam" else torch.optim.AdamW
        return cls(pg, lr=h["lr"], betas=(h["beta1"], h["beta2"]), eps=h["eps"],
                   weight_decay=h["weight_decay"], amsgrad=bool(h["amsgrad"]), foreach=False)
    if kind == "rmsprop":
        return torch.optim.RMSprop(pg, lr=h["lr"], alpha=h["alpha"], eps=h["eps"],
                                   weight_decay=h["weight_decay"], momentum=h["momentum"],
                                   centered=bool(h["centered"]), foreach=False)
    if kind == "adagrad":
        return torch.optim.Adagrad(pg, lr=h["lr"], lr_decay=h["lr_decay"],
                                   weight_decay=h["weight_decay"],
                                   initial_accumulator_value=h["initial_accumulator_value"],
                                   eps=h["eps"], foreach=False)
    raise ValueError(kind)


HYPER = {
    "sgd": dict(lr=0.1, momentum=0.9, dampening=0.0, nesterov=0, weight_decay=0.0),
    "sgd_nesterov_wd": dict(lr=0.05, momentum=0.9, dampening=0.0, nesterov=1, weight_decay=0.01),
    "adam": dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, amsgrad=0),
    "adam_wd_amsgrad": dict(lr=0.05, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.1, amsgrad=1),
    "adamw": dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, amsgrad=0),
    "adamw_amsgrad": dict(lr=0.05, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, amsgrad=1),
    "rmsprop": dict(lr=0.01, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0, centered=0),
    "rmsprop_centered_momentum": dict(lr=0.01, alpha=0.9, eps=1e-8, weight_decay=0.01,
                                      momentum=0.5, centered=1),
    "adagrad": dict(lr=0.1, lr_decay=0.01, weight_decay=0.01, initial_accumulator_value=0.1,
                    eps=1e-10),
}
KIND = {
    "sgd": "sgd", "sgd_nesterov_wd": "sgd", "adam": "adam", "adam_wd_amsgrad": "adam",
    "adamw": "adamw", "adamw_amsgrad": "adamw", "rmsprop": "rmsprop",
    "rmsprop_centered_momentum": "rmsprop", "adagrad": "adagrad",
}


def slow_opts(scale=0.1, max_relative_step=None, max_relative_drift=None, norm_floor=0.0,
              hold_steps=None, ramp_steps=0, final_scale=1.0):
    return dict(scale=scale, max_relative_step=max_relative_step,
                max_relative_drift=max_relative_drift, norm_floor=norm_floor,
                hold_steps=hold_steps, ramp_steps=ramp_steps, final_scale=final_scale)


def run_case(name, hyper_name, slow, gen, shapes=SHAPES, group_of=None, group_lrs=None,
             zero_init=(), grad_scale=1.0, expect_active=None):
    kind = KIND[hyper_name]
    hyper = HYPER[hyper_name]
    n = len(shapes)
    group_of = group_of or [0] * n
    group_lrs = group_lrs or [hyper["lr"]]
    init = []
    for i, shape in enumerate(shapes):
        if i in zero_init:
            init.append(torch.zeros(shape, dtype=torch.float64))
        else:
            init.append(torch.randn(shape, dtype=torch.float64, generator=gen))
    grads = [[torch.randn(shape, dtype=torch.float64, generator=gen) * grad_scale
              for shape in shapes] for _ in range(NUM_STEPS)]

    params = [t.clone().requires_grad_(True) for t in init]
    groups = [([params[i] for i in range(n) if group_of[i] == g], lr)
              for g, lr in enumerate(group_lrs)]
    opt = make_optimizer(kind, hyper, groups)
    theta0 = [t.clone() for t in init]
    after = []
    active = {"step": 0, "drift": 0}
    for t in range(NUM_STEPS):
        for p, g in zip(params, grads[t]):
            p.grad = g.clone()
        prev = [p.detach().clone() for p in params]
        opt.step()
        s = scale_at(t, slow)
        r, big_r, floor = slow["max_relative_step"], slow["max_relative_drift"], slow["norm_floor"]
        with torch.no_grad():
            if s != 1.0 or r is not None:
                for p, q in zip(params, prev):
                    delta = (p - q) * s
                    if r is not None:
                        radius = r * max(norm(q), floor)
                        dn = norm(delta)
                        if radius > 0 and dn > radius:
                            delta = delta * (radius / dn)
                            active["step"] += 1
                    p.copy_(q + delta)
            if big_r is not None:
                for p, z in zip(params, theta0):
                    radius = big_r * max(norm(z), floor)
                    d = p - z
                    dn = norm(d)
                    if radius > 0 and dn > radius:
                        p.copy_(z + d * (radius / dn))
                        active["drift"] += 1
        after.append([p.detach().clone() for p in params])
    if expect_active:
        for key in expect_active:
            if active[key] == 0:
                sys.exit(f"case {name}: the {key} bound never applied; the case would test nothing")
    return dict(name=name, kind=kind, hyper=hyper, slow=slow, shapes=shapes, group_of=group_of,
                group_lrs=group_lrs, init=init, grads=grads, after=after, active=active)


def fmt(x):
    if x is None:
        return "none"
    if isinstance(x, bool):
        return str(int(x))
    if isinstance(x, int):
        return str(x)
    return repr(float(x))


def values(t):
    return " ".join(repr(v) for v in t.reshape(-1).tolist())


def write_case(out, c):
    out.write(f"case {c['name']}\n")
    out.write(f"# bound applications: step {c['active']['step']}, drift {c['active']['drift']}\n")
    out.write(f"optimizer {c['kind']}\n")
    out.write("hyper " + " ".join(f"{k} {fmt(v)}" for k, v in c["hyper"].items()) + "\n")
    out.write("slow " + " ".join(f"{k} {fmt(v)}" for k, v in c["slow"].items()) + "\n")
    out.write(f"groups {len(c['group_lrs'])}\n")
    for g, lr in enumerate(c["group_lrs"]):
        out.write(f"group {g} lr {fmt(lr)}\n")
    for i, shape in enumerate(c["shapes"]):
        out.write(f"param {i} group {c['group_of'][i]} shape {len(shape)} "
                  + " ".join(str(d) for d in shape) + "\n")
    out.write(f"steps {NUM_STEPS}\n")
    for i, t in enumerate(c["init"]):
        out.write(f"init {i} {values(t)}\n")
    for t in range(NUM_STEPS):
        for i, g in enumerate(c["grads"][t]):
            out.write(f"grad {t} {i} {values(g)}\n")
        for i, p in enumerate(c["after"][t]):
            out.write(f"after {t} {i} {values(p)}\n")
    out.write("end\n")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(here, "optim_trajectories.txt"))
    args = ap.parse_args()
    torch.use_deterministic_algorithms(True)
    gen = torch.Generator().manual_seed(20250809)

    cases = []
    # Every base optimizer: plain (scale 1, must equal the base optimizer) and scaled by 0.3.
    for h in HYPER:
        cases.append(run_case(f"{h}/plain", h, slow_opts(scale=1.0), gen))
        cases.append(run_case(f"{h}/scale_0.3", h, slow_opts(scale=0.3), gen))
    # Relative step bound (per tensor), with and without scaling.
    cases.append(run_case("sgd/step_bound", "sgd", slow_opts(scale=1.0, max_relative_step=0.05),
                          gen, expect_active=["step"]))
    cases.append(run_case("adamw/scale_0.5_step_bound", "adamw",
                          slow_opts(scale=0.5, max_relative_step=0.01), gen,
                          expect_active=["step"]))
    cases.append(run_case("rmsprop/scale_0.5_step_bound", "rmsprop",
                          slow_opts(scale=0.5, max_relative_step=0.005), gen,
                          expect_active=["step"]))
    # Drift bound around the initial weights.
    cases.append(run_case("adam/scale_0.5_drift_bound", "adam",
                          slow_opts(scale=0.5, max_relative_drift=0.05), gen,
                          expect_active=["drift"]))
    cases.append(run_case("sgd_nesterov_wd/drift_bound", "sgd_nesterov_wd",
                          slow_opts(scale=1.0, max_relative_drift=0.1), gen,
                          expect_active=["drift"]))
    # Both bounds, a zero-initialized bias moved only thanks to norm_floor.
    cases.append(run_case("adamw/both_bounds_norm_floor", "adamw",
                          slow_opts(scale=0.5, max_relative_step=0.02, max_relative_drift=0.06,
                                    norm_floor=0.5),
                          gen, zero_init=(1,), expect_active=["step", "drift"]))
    # A zero-initialized bias with norm_floor 0: radius 0, the bounds do not apply to it.
    cases.append(run_case("sgd/both_bounds_zero_tensor", "sgd",
                          slow_opts(scale=0.5, max_relative_step=0.05, max_relative_drift=0.1),
                          gen, zero_init=(1,), expect_active=["step", "drift"]))
    # Schedules.
    cases.append(run_case("adamw/hold_then_ramp_2_3", "adamw",
                          slow_opts(scale=0.2, hold_steps=2, ramp_steps=3, final_scale=1.0), gen))
    cases.append(run_case("sgd/hold_then_ramp_1_0_to_0.5", "sgd",
                          slow_opts(scale=0.1, hold_steps=1, ramp_steps=0, final_scale=0.5), gen))
    cases.append(run_case("adagrad/hold_then_ramp_0_4_drift", "adagrad",
                          slow_opts(scale=0.3, hold_steps=0, ramp_steps=4, final_scale=0.9,
                                    max_relative_drift=0.08), gen, expect_active=["drift"]))
    # Two param groups with different learning rates.
    three = [(3, 4), (4,), (2, 2)]
    cases.append(run_case("sgd/two_groups_scale_0.4", "sgd", slow_opts(scale=0.4), gen,
                          shapes=three, group_of=[0, 1, 1], group_lrs=[0.1, 0.02]))
    cases.append(run_case("adamw/two_groups_scale_0.4_step_bound", "adamw",
                          slow_opts(scale=0.4, max_relative_step=0.01), gen, shapes=three,
                          group_of=[1, 0, 1], group_lrs=[0.05, 0.005], expect_active=["step"]))

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as out:
        out.write("# Golden Slow Tuning trajectories, torch.optim (Python) float64 peer.\n")
        out.write("# Generated by tests/golden/gen_optim_golden.py with torch "
                  f"{torch.__version__}; do not edit by hand.\n")
        out.write("format 1\n")
        for c in cases:
            write_case(out, c)
    print(f"wrote {len(cases)} cases to {args.out} ({os.path.getsize(args.out)} bytes)")


if __name__ == "__main__":
    main()
