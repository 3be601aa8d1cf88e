"""Build of the optional CUDA extension ``sat_kernels._C``, used by setup.py.

nvcc compiles the ``.cu`` files (in parallel, ``MAX_JOBS`` at a time, ``--threads NVCC_THREADS`` each), the host C++
compiler compiles the pybind11 bindings and links everything with the static CUDA runtime, so the module needs neither
the torch build nor a ``libcudart.so`` at run time. Nothing here imports torch. The environment variables are
documented in ENVs.md:

- ``SAT_KERNELS_SKIP_CUDA_BUILD=1``: do not build the extension.
- ``SAT_KERNELS_FORCE_CUDA_BUILD=1``: a missing nvcc or a failed build is an error (default: a warning, and the
  pure-Python package installs without the ``"cuda"`` backend).
- ``SAT_KERNELS_CUDA_ARCHS``: GPU architectures, default ``"80;90"`` (SASS for each, PTX for the newest).
- ``CUDA_HOME`` / ``CUDA_PATH``: the toolkit; default: the one of ``nvcc`` on ``PATH``.
- ``MAX_JOBS`` (default: the CPU count) compilations at a time, each nvcc with ``--threads NVCC_THREADS``.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

from setuptools import Extension
from setuptools.command.build_ext import build_ext

CSRC = Path(__file__).resolve().parent
CU_SOURCES = ("select.cu", "gather_scatter.cu")
HOST_SOURCES = ("bindings.cpp",)
HEADERS = ("common.cuh", "selection_keys.cuh", "sat_kernels.h")
DEFAULT_ARCHS = "80;90"
EXT_NAME = "sat_kernels._C"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def log(msg: str) -> None:
    print(f"sat_kernels build: {msg}", file=sys.stderr, flush=True)


def find_nvcc() -> Optional[str]:
    """nvcc of ``CUDA_HOME`` (or ``CUDA_PATH``) when set, else the one on ``PATH``; ``None`` if there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = Path(home) / "bin" / "nvcc"
            return str(nvcc) if nvcc.is_file() else None
    return shutil.which("nvcc")


def cuda_library_dir(nvcc: str) -> Path:
    """The directory holding ``libcudart_static.a`` of nvcc's toolkit (nvcc may be a wrapper script elsewhere)."""
    tops = [Path(nvcc).resolve().parent.parent]
    dryrun = subprocess.run([nvcc, "--dryrun", "x.cu"], capture_output=True, text=True)
    for line in (dryrun.stdout + dryrun.stderr).splitlines():
        m = re.match(r"#\$ TOP=(.+)$", line.strip())
        if m:
            tops.insert(0, Path(m.group(1).strip().strip('"')).resolve())
    for top in tops:
        for cand in [top / "lib64", top / "lib", *sorted(top.glob("targets/*/lib"))]:
            if (cand / "libcudart_static.a").is_file():
                return cand
    raise RuntimeError(f"libcudart_static.a not found in the CUDA toolkit of {nvcc} (looked under "
                       f"{', '.join(map(str, tops))}); set CUDA_HOME")


def parse_archs(spec: str) -> List[str]:
    """``"80;90"``, ``"8.0 9.0"``, ``"sm_80,sm_90a"`` -> ``["80", "90"]`` / ``["80", "90a"]``."""
    archs = []
    for item in re.split(r"[;,\s]+", spec.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)(?:\+ptx)?", item.lower())
        if not m:
            raise ValueError(f"SAT_KERNELS_CUDA_ARCHS: cannot read {item!r}; expected a list like '80;90' or '8.0;9.0'")
        archs.append(m.group(1) + (m.group(2) or "") + m.group(3))
    if not archs:
        raise ValueError("SAT_KERNELS_CUDA_ARCHS is empty; expected a list like '80;90'")
    return sorted(set(archs), key=lambda a: (int(re.sub(r"\D", "", a)), a))


def gencode_flags(archs: List[str]) -> List[str]:
    """SASS for every architecture, PTX for the newest (so newer GPUs JIT-compile it)."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = re.sub(r"\D", "", archs[-1])
    flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


def positive_int_env(name: str, default: int) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return int(raw)


def cuda_extensions() -> List[Extension]:
    """The extension list for ``setup(ext_modules=...)``: empty when the build is skipped or nvcc is missing."""
    if env_flag("SAT_KERNELS_SKIP_CUDA_BUILD"):
        log("SAT_KERNELS_SKIP_CUDA_BUILD is set: not building the CUDA extension sat_kernels._C")
        return []
    if find_nvcc() is None:
        msg = ("nvcc not found (PATH, CUDA_HOME, CUDA_PATH): not building the CUDA extension sat_kernels._C; "
               "the package works without it (backends torch, triton)")
        if env_flag("SAT_KERNELS_FORCE_CUDA_BUILD"):
            raise RuntimeError(f"SAT_KERNELS_FORCE_CUDA_BUILD=1 but {msg.split(':')[0]}")
        log(msg)
        return []
    sources = [str((CSRC / s).relative_to(CSRC.parent)) for s in CU_SOURCES + HOST_SOURCES]
    depends = [str((CSRC / h).relative_to(CSRC.parent)) for h in HEADERS]
    return [Extension(EXT_NAME, sources=sources, depends=depends, optional=True)]


class BuildExtension(build_ext):
    """build_ext that compiles ``.cu`` sources with nvcc and links with the host C++ compiler.

    A failure warns and leaves the extension out (the pure-Python package still installs), unless
    ``SAT_KERNELS_FORCE_CUDA_BUILD=1``.
    """

    def build_extensions(self):
        failed = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
            except Exception as exc:  # any failure of the optional build is reported, not fatal
                if env_flag("SAT_KERNELS_FORCE_CUDA_BUILD") or not ext.optional:
                    raise
                log(f"WARNING: building {ext.name} FAILED, installing without it (no 'cuda' backend; "
                    f"sat_kernels.unavailable_backends() says why). Set SAT_KERNELS_FORCE_CUDA_BUILD=1 to make "
                    f"this an error. Cause: {exc}")
                failed.append(ext)
        for ext in failed:
            self.extensions.remove(ext)

    def build_extension(self, ext):
        if ext.name != EXT_NAME:
            return super().build_extension(ext)
        start = time.perf_counter()
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("nvcc not found (PATH, CUDA_HOME, CUDA_PATH)")
        try:
            import pybind11
        except ImportError as exc:
            raise RuntimeError("pybind11 is not installed in the build environment (pip install pybind11)") from exc
        archs = parse_archs(os.environ.get("SAT_KERNELS_CUDA_ARCHS", DEFAULT_ARCHS))
        cpus = os.cpu_count() or 1
        jobs = positive_int_env("MAX_JOBS", cpus)
        # default: the cores left over by the parallel files, at most one thread per target (SASS per arch + PTX)
        nvcc_threads = positive_int_env("NVCC_THREADS", max(1, min(len(archs) + 1,
                                                                   cpus // min(jobs, len(ext.sources)))))
        lib_dir = cuda_library_dir(nvcc)
        root = CSRC.parent
        tmp = Path(self.build_temp) / "sat_kernels_C"
        tmp.mkdir(parents=True, exist_ok=True)
        include = [f"-I{CSRC}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        cxx = os.environ.get("CXX", "c++").split()

        commands = []
        for src in ext.sources:
            path = root / src
            obj = tmp / (path.name + ".o")
            if path.suffix == ".cu":
                cmd = [nvcc, "-c", str(path), "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       "-Xcompiler", "-fvisibility=hidden", f"--threads={nvcc_threads}", f"-I{CSRC}",
                       *gencode_flags(archs)]
            else:
                cmd = [*cxx, "-c", str(path), "-o", str(obj), "-O2", "-std=c++17", "-fPIC", "-fvisibility=hidden",
                       *include]
            commands.append((obj, cmd))
        log(f"compiling {len(commands)} sources for sm_{', sm_'.join(archs)} (+PTX) with {nvcc}, "
            f"MAX_JOBS={jobs}, NVCC_THREADS={nvcc_threads}")
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            results = list(pool.map(lambda c: subprocess.run(c[1], capture_output=True, text=True), commands))
        for (_, cmd), res in zip(commands, results):
            if res.returncode != 0:
                raise RuntimeError(f"command failed ({res.returncode}): {' '.join(cmd)}\n{res.stdout}{res.stderr}")

        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        link = [*cxx, "-shared", *[str(o) for o, _ in commands], f"-L{lib_dir}", "-lcudart_static", "-ldl", "-lrt",
                "-lpthread", "-o", str(out)]
        res = subprocess.run(link, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"link failed ({res.returncode}): {' '.join(link)}\n{res.stdout}{res.stderr}")
        log(f"built {out.name} in {time.perf_counter() - start:.1f} s")
