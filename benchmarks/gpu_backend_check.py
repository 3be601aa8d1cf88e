"""The GPU backends at Llama-2-7B MLP shapes against the torch backend, at the kept set each one chose.

For every token count T (default 8192 and 8191: a multiple of 16 and not), omission rate (default 0.5: k = 5504,
and 0.6: k = 4403, not a multiple of 16) and backend (default triton and cuda; forward="dense" too at the first T
and rate):

- the first call (forward + backward; the triton backend compiles, and autotunes when the power-of-two bucket of T
  and k is new) and the second call are timed (host clock around a synchronised call);
- the torch backend runs again at the kept set the backend chose, and the output, dx and every weight gradient are
  compared with it (relative RMS); the verdict follows the tests' rule: against an fp64 masked-dense reference at
  that kept set, the backend's error is at most 2x the torch backend's plus eps/8 in every tensor, no NaN, and
  omitted rows/columns get exactly zero gradient;
- ``kept_overlap``: the fraction of the kept set that the torch backend's own selection shares (near-ties may
  differ: the scores are accumulated in a different order);
- ``repeat_equal``: whether the second call reproduced the first bitwise.

One JSON line per result is printed as soon as it exists (and appended to ``--out``), so a run cut short keeps every
finished line. Exit status 1 if a backend is missing or a result fails. On CPU it runs under ``TRITON_INTERPRET=1``
at tiny shapes (``--device cpu --dtype fp32 --shape 37 40 70``; tests/test_triton.py does), on a GPU::

    python benchmarks/gpu_backend_check.py --out backends.jsonl
"""
import argparse
import json
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NAMES = ("y", "dx", "dw_gate", "dw_up", "dw_down")


def _operands(T, h, inter, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    leaves = [randn(T, h), randn(inter, h, scale=h ** -0.5), randn(inter, h, scale=h ** -0.5),
              randn(h, inter, scale=inter ** -0.5)]
    return [t.requires_grad_() for t in leaves], randn(T, h)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, leaves, dy, device):
    """``(seconds, [y, dx, dW_gate, dW_up, dW_down], idx)`` of one synchronised forward + backward."""
    _sync(device)
    start = time.perf_counter()
    y, idx = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, dy)
    _sync(device)
    return time.perf_counter() - start, [y.detach(), *grads], idx


def _rel_rms(a, ref):
    ref = ref.double()
    return ((a.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _torch_at(leaves, dy, idx, forward):
    """The torch backend's output and gradients at the kept set ``idx`` (its launcher, with that set selected)."""
    from sat_kernels.ops.mlp.function import sat_mlp_torch
    from sat_kernels.ops.selector import Selection

    def select(a, select_fn=None):
        return Selection(idx, torch.empty(0))

    x, wg, wu, wd = leaves
    y, _ = sat_mlp_torch(x, wg, wu, wd, select, "silu", forward)
    return [y.detach(), *torch.autograd.grad(y, leaves, dy)]


def _reference_at(leaves, dy, idx, forward):
    from sat_kernels.ops.reference import reference_mlp

    ref = [t.detach().double().requires_grad_() for t in leaves]
    y = reference_mlp(*ref, idx, forward=forward)
    return [y.detach(), *torch.autograd.grad(y, ref, dy.double())]


def check_case(backend, T, h, inter, rate, forward, dtype, device):
    """One result row (see the module docstring)."""
    import sat_kernels as sk

    leaves, dy = _operands(T, h, inter, dtype, device)

    def call(*ops):
        return sk.sat_mlp(*ops, rate, backend=backend, forward=forward, return_indices=True)

    first_s, first, idx = _timed(call, leaves, dy, device)
    second_s, second, idx2 = _timed(call, leaves, dy, device)
    repeat_equal = torch.equal(idx, idx2) and all(torch.equal(a, b) for a, b in zip(first, second))
    del second
    torch_out = _torch_at(leaves, dy, idx, forward)
    vs_torch = {n: _rel_rms(a, b) for n, a, b in zip(NAMES, first, torch_out)}
    ref = _reference_at(leaves, dy, idx, forward)
    err = {n: _rel_rms(a, r) for n, a, r in zip(NAMES, first, ref)}
    err_torch = {n: _rel_rms(a, r) for n, a, r in zip(NAMES, torch_out, ref)}
    del ref, torch_out
    eps = torch.finfo(dtype).eps
    omitted = torch.ones(inter, dtype=torch.bool, device=device)
    omitted[idx] = False
    _, _, dwg, dwu, dwd = first
    zeros = bool((dwg[omitted] == 0).all() and (dwu[omitted] == 0).all() and (dwd[:, omitted] == 0).all())
    finite = all(bool(torch.isfinite(t).all()) for t in first)
    own = sk.sat_mlp(*(t.detach() for t in leaves), rate, backend="torch", return_indices=True)[1]
    kept_overlap = torch.isin(idx, own).float().mean().item()
    ok = finite and zeros and all(err[n] <= 2 * err_torch[n] + eps / 8 for n in NAMES)
    return {"backend": backend, "T": T, "h": h, "I": inter, "omission_rate": rate, "k": idx.numel(),
            "forward": forward, "dtype": str(dtype).replace("torch.", ""), "first_call_s": first_s,
            "second_call_s": second_s, "repeat_equal": repeat_equal, "kept_overlap": kept_overlap,
            "rel_rms_vs_torch": vs_torch, "err_vs_fp64": err, "torch_err_vs_fp64": err_torch,
            "omitted_grads_zero": zeros, "finite": finite, "ok": ok}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="append the JSON lines to this file too")
    parser.add_argument("--backends", nargs="+", default=["triton", "cuda"])
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 8191])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.5, 0.6])
    parser.add_argument("--shape", type=int, nargs=2, default=[4096, 11008], metavar=("H", "I"))
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu_backend_check.py needs a CUDA GPU (or --device cpu under TRITON_INTERPRET=1)",
              file=sys.stderr)
        return 2
    import sat_kernels as sk

    def emit(row):
        line = json.dumps(row, sort_keys=True)
        print(line, flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(line + "\n")

    failed = False
    for backend in args.backends:
        if backend not in sk.available_backends():
            emit({"backend": backend, "ok": False, "error": sk.unavailable_backends().get(backend, "unknown")})
            failed = True
    backends = [b for b in args.backends if b in sk.available_backends()]
    h, inter = args.shape
    cases = [(T, rate, "sparse") for T in args.tokens for rate in args.rates]
    cases.insert(1, (args.tokens[0], args.rates[0], "dense"))
    for T, rate, forward in cases:
        for backend in backends:
            try:
                row = check_case(backend, T, h, inter, rate, forward, DTYPES[args.dtype], device)
            except Exception as exc:  # noqa: BLE001 - a crash is a result too; the other cases still run
                row = {"backend": backend, "T": T, "omission_rate": rate, "forward": forward, "ok": False,
                       "error": f"{type(exc).__name__}: {exc}"}
            failed |= not row["ok"]
            emit(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
