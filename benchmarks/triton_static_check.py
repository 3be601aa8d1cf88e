"""Static check of the Triton kernels for Hopper without a GPU: compile every autotune config to an sm_90a cubin and
report registers, spill stack, shared memory, whether the loop became wgmma, and how many 16-byte ``cp.async`` loads
and 16-byte stores the kernel issues (masks that are not constant over 8 bf16 elements turn them into scalar ones).

Needs triton (tested 3.6 and 3.9) and its bundled cuobjdump; no CUDA device, no driver. Integer arguments are
compiled as divisible by 16 (as Triton specialises them at launch for the Llama shapes and the padded row strides).
The numbers quoted in ``sat_kernels/ops/mlp/triton/utils.py`` come from this script. Compile-time resources only: it
says nothing about speed (``benchmarks/triton_mlp_speed.py`` measures that on a GPU). :func:`compile_launch` compiles
one recorded launch with the specialisation Triton gives its actual arguments (``tests/test_triton.py`` uses it).

    python benchmarks/triton_static_check.py --dtype bf16
"""
import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from sat_kernels.ops.mlp.triton import down, gate_up, utils

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
          torch.int64: "i64", torch.int32: "i32"}


def kernels(dtype: str):
    """``(label, autotuned kernel, pointer types, constexprs, configs)`` for every kernel variant the backend runs.

    fp32: with TF32 and the fp32 configs (without TF32 the backend runs fp32 on the torch backend)."""
    p, i64 = "*" + dtype, "*i64"
    prec = "tf32"
    fp32 = dtype == "fp32"
    two = utils.TWO_ACC_FP32_CONFIGS if fp32 else utils.TWO_ACC_CONFIGS
    one = utils.ONE_ACC_FP32_CONFIGS if fp32 else utils.ONE_ACC_CONFIGS
    swiglu = utils.SWIGLU_BWD_FP32_CONFIGS if fp32 else utils.SWIGLU_BWD_CONFIGS
    gu = {"x_ptr": p, "wg_ptr": p, "wu_ptr": p, "idx_ptr": i64, "g_ptr": p, "u_ptr": p, "a_ptr": p, "part_ptr": "*fp64",
          "mask_ptr": "*u8"}
    dn = {"a_ptr": p, "wd_ptr": p, "idx_ptr": i64, "y_ptr": p}
    db = {"dy_ptr": p, "wd_ptr": p, "idx_ptr": i64, "g_ptr": p, "u_ptr": p, "dg_ptr": p, "du_ptr": p, "a_ptr": p}
    return [
        ("gate_up_fwd scores", gate_up._gate_up_fwd_kernel, gu,
         dict(HAS_IDX=False, STORE_A=False, SCORE=1, HAS_MASK=False, ACT=0, PRECISION=prec, ROWS=utils.SCORE_ROWS),
         two),
        ("gate_up_fwd scores, token mask", gate_up._gate_up_fwd_kernel, gu,
         dict(HAS_IDX=False, STORE_A=False, SCORE=1, HAS_MASK=True, ACT=0, PRECISION=prec, ROWS=utils.SCORE_ROWS),
         two),
        ("gate_up_fwd kept rows", gate_up._gate_up_fwd_kernel, gu,
         dict(HAS_IDX=True, STORE_A=True, SCORE=0, HAS_MASK=False, ACT=0, PRECISION=prec, ROWS=utils.SCORE_ROWS),
         two),
        ("gate_up_weight_bwd", gate_up._gate_up_weight_bwd_kernel,
         {"dg_ptr": p, "du_ptr": p, "x_ptr": p, "idx_ptr": i64, "dwg_ptr": p, "dwu_ptr": p}, dict(PRECISION=prec), two),
        ("gate_up_input_bwd", gate_up._gate_up_input_bwd_kernel,
         {"dg_ptr": p, "du_ptr": p, "wg_ptr": p, "wu_ptr": p, "idx_ptr": i64, "dx_ptr": p}, dict(PRECISION=prec), one),
        ("down_fwd compact", down._down_fwd_kernel, dn, dict(GATHER=False, PRECISION=prec), one),
        ("down_fwd gather", down._down_fwd_kernel, dn, dict(GATHER=True, PRECISION=prec), one),
        ("down_bwd compact", down._down_bwd_kernel, db, dict(GATHER=False, ACT=0, PRECISION=prec), swiglu),
        ("down_bwd gather", down._down_bwd_kernel, db, dict(GATHER=True, ACT=0, PRECISION=prec), swiglu),
        ("down_weight_bwd", down._down_weight_bwd_kernel, {"dy_ptr": p, "a_ptr": p, "dws_ptr": p},
         dict(PRECISION=prec), one),
    ]


def compile_sm90(fn, signature, constexprs, attrs, num_warps, num_stages) -> dict:
    """Compile a ``triton.jit`` function for sm_90a; its compile-time resources and memory instructions."""
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 64),
                              options=dict(num_warps=num_warps, num_stages=num_stages))
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    ptx = compiled.asm["ptx"]
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return dict(regs=int(regs), stack=int(stack), shared=compiled.metadata.shared, wgmma="wgmma" in ptx,
                cp_async16=len(re.findall(r"cp\.async\.c[ag]\.shared\.global[^;]*, 0x10[,;]", ptx)),
                st16=len(re.findall(r"st\.global(?:\.\w+)*\.v4\.b32", ptx)),
                st_scalar=len(re.findall(r"st\.global(?:\.\w+)*\.b16 ", ptx)))


def compile_launch(kernel, args: tuple, kwargs: dict) -> dict:
    """:func:`compile_sm90` of one launch of ``kernel`` (a ``triton.jit`` function or its autotuner) with these
    arguments, specialised as Triton does at launch: ``None`` and integers equal to 1 become constants, integers
    divisible by 16 and 16-byte aligned tensors get ``tt.divisibility`` 16."""
    fn = kernel
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    values = dict(zip(fn.arg_names, args), **{k: v for k, v in kwargs.items() if k in fn.arg_names})
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        value = values[name]
        if name in constexpr_names or value is None or (type(value) is int and value == 1):
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return compile_sm90(fn, signature, constexprs, attrs, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))


def check(label, kernel, pointers, consts, config):
    fn = kernel.fn
    constexprs = dict(consts, **config.kwargs)
    signature = {n: "constexpr" if n in constexprs else pointers.get(n, "i32") for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if signature[n] != "constexpr"}
    r = compile_sm90(fn, signature, constexprs, attrs, config.num_warps, config.num_stages)
    tile = "x".join(str(config.kwargs[k]) for k in ("BM", "BN", "BK"))
    return (f"| {label} | {tile} | {config.num_warps} | {config.num_stages} | {r['regs']} | {r['stack']} | "
            f"{r['shared']} | {'yes' if r['wgmma'] else 'no'} | {r['cp_async16']} | {r['st16']} | {r['st_scalar']} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    args = parser.parse_args(argv)
    if utils.INTERPRET:
        raise SystemExit("unset TRITON_INTERPRET: the interpreter has one tiny config and compiles nothing")
    print(f"triton {triton.__version__}, sm_90a, {args.dtype}\n")
    print("| kernel | BMxBNxBK | warps | stages | registers | spill stack (B) | shared (B) | wgmma | 16-byte cp.async "
          "| 16-byte stores | 2-byte stores |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, kernel, pointers, consts, configs in kernels(args.dtype):
        for config in configs:
            print(check(label, kernel, pointers, consts, config), flush=True)


if __name__ == "__main__":
    main()
