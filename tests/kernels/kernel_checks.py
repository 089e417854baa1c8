"""Shared by the kernel tests: the norm-relative error, NaN-poisoned output buffers (an element a kernel does not
write then fails the test), and compiling a kernel for Hopper without a GPU. Importable: pytest puts tests/kernels/
on sys.path."""

import json
import os
import subprocess
import sys

import torch


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def nan_buffer(shape, like, dtype=None):
    """NaN for floating outputs; for integer ones (no NaN) the most negative value, which no index takes."""
    dtype = dtype or like.dtype
    fill = float("nan") if dtype.is_floating_point else torch.iinfo(dtype).min
    return torch.full(shape, fill, device=like.device, dtype=dtype)


def poison(monkeypatch, *modules):
    """Make every `new_buffer` of the given kernel modules allocate NaN-filled outputs."""
    for module in modules:
        monkeypatch.setattr(module, "new_buffer", nan_buffer)


_COMPILE = """
import json, sys, importlib, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
module, kernel, signature, constexprs, options = json.loads(sys.argv[1])
fn = getattr(importlib.import_module(module), kernel)
signature.update({name: "constexpr" for name in constexprs})
compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options=options)
assert compiled.asm["cubin"]
sys.stdout.write(compiled.asm["ptx"])
"""


def compile_for_hopper(module: str, kernel: str, signature: dict, constexprs: dict, **options) -> str:
    """Compile `module.kernel` for sm_90 down to its cubin, ahead of time (Triton's compiler and ptxas run on the
    CPU), in a fresh process: the tests' own process defines kernels for the interpreter (TRITON_INTERPRET=1), which
    cannot be compiled. `signature`: the runtime arguments' Triton types ("*bf16", "i32", "fp32"); `constexprs`: the
    rest; `options`: the launch's (num_warps, enable_fp_fusion, ...). Returns the PTX; raises with the compiler's
    message if it fails."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps([module, kernel, signature, constexprs, {"num_warps": 4, **options}])
    run = subprocess.run([sys.executable, "-c", _COMPILE, args], env=env, capture_output=True, text=True)
    if run.returncode:
        raise AssertionError(f"{module}.{kernel} did not compile for sm_90:\n{run.stderr[-3000:]}")
    return run.stdout
