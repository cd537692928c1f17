"""The ``dpkernels`` command: ``info`` and ``demo`` (the end-to-end transformers pipeline comes later)."""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def _info(_args) -> int:
    import dpkernels

    print(json.dumps(dpkernels.info(), indent=2))
    return 0


def run_demo(*, features: int = 256, density: float = 0.005, samples: int = 4096, steps: int = 300,
             l0_lambda: float = 2e-3, seed: int = 0, device: str = "cpu", log=print) -> dict:
    """Recover a planted sparse diff with one DiffLinear, the whole L0 machinery end to end.

    A frozen "pretrained" layer theta0 and a task layer theta0 + delta, delta with `density` of the
    entries nonzero; a DiffLinear starting from theta0 learns the diff from (x, task(x)) pairs with
    the hard-concrete gates and the L0 penalty. Reports the fit and how well the kept entries
    (the largest |z_eval * w|, as many as delta has) match delta's support.
    """
    from .nn import DiffLinear

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    base = torch.nn.Linear(features, features, device=device)
    k = max(1, round(density * features * features))
    support = torch.randperm(features * features, generator=gen)[:k]
    delta = torch.zeros(features * features)
    delta[support] = torch.randn(k, generator=gen).sign() * (0.5 + torch.rand(k, generator=gen))
    target = base.weight.detach() + delta.view(features, features).to(device)
    x = torch.randn(samples, features, generator=gen).to(device)
    y = x @ target.t() + base.bias.detach()

    layer = DiffLinear.from_linear(base, l0_lambda=l0_lambda)
    opt = torch.optim.Adam([{"params": [layer.diff, layer.bias_diff], "lr": 0.05},
                            {"params": [layer.log_alpha, layer.bias_log_alpha], "lr": 0.1}])
    layer.train()
    start = time.perf_counter()
    for step in range(steps + 1):
        batch = torch.randint(0, samples, (256,), generator=gen)
        loss = torch.nn.functional.mse_loss(layer(x[batch]), y[batch])
        if step % 100 == 0:
            log(f"step {step:4d}  mse {loss.item():.4f}  E[L0] {layer.expected_l0().item():9.1f}")
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()  # l0_lambda is fused into the gate backward kernel
        opt.step()
    elapsed = time.perf_counter() - start

    layer.eval()
    with torch.no_grad():
        eval_mse = torch.nn.functional.mse_loss(layer(x), y).item()
        base_mse = torch.nn.functional.mse_loss(base(x), y).item()
        from .ops import eval_gates

        magnitude = (eval_gates(layer.log_alpha) * layer.diff).abs().flatten().cpu()
        kept = set(magnitude.topk(k).indices.tolist())
    recovered = len(kept & set(support.tolist())) / k
    result = {"features": features, "planted_nonzeros": k, "train_steps": steps, "seconds": round(elapsed, 2),
              "mse_base": base_mse, "mse_diff_pruned": eval_mse, "support_recovered": recovered,
              "expected_l0": layer.expected_l0().item(), "backend": _backend_used()}
    log(json.dumps(result, indent=2))
    return result


def _backend_used() -> str:
    from .backends import info

    return info()["last_used"].get("gate_apply", "?")


def _demo(args) -> int:
    run_demo(features=args.features, steps=args.steps, seed=args.seed, device=args.device)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="dpkernels", description="Fast diff pruning for PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, CUDA device, backends available and chosen").set_defaults(func=_info)
    demo = sub.add_parser("demo", help="recover a planted 0.5%% sparse diff with one DiffLinear (CPU, seconds)")
    demo.add_argument("--features", type=int, default=256)
    demo.add_argument("--steps", type=int, default=300)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    demo.set_defaults(func=_demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
