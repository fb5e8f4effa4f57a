"""nvcc compiles every CUDA kernel for sm_80 (A100) and sm_90 (H100), without a GPU.

One nvcc call builds tm_kernels.cu (the sources that ship with the package,
timemachine.backends.kernel_dir()) for both architectures with -gencode, and ptxas's
resource report (--resource-usage) lists every entry function it compiled for each; the
test fails with the compiler output if the build fails or if an entry the Python side
launches (backends.abi.KERNELS) was not compiled for an architecture. Skipped where nvcc
is absent.

NVRTC is the compiler that actually runs at run time (CuPy's RawModule), and it differs
from nvcc: no host compiler and no C++ standard library headers. The NVRTC tests load
libnvrtc (the nvidia-cuda-nvrtc wheel of the test extra, else the CUDA toolkit) with
ctypes and compile the same source with the options CuPy passes, for compute_80 (PTX) and
sm_90 (cubin). Compiling needs no GPU. Skipped where libnvrtc is absent.
"""

import ctypes
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import time

import pytest

from timemachine.backends import kernel_dir
from timemachine.backends.abi import KERNELS
from timemachine.backends.cupy_backend import nvrtc_options

ARCHS = (80, 90)


def find_nvcc():
    """nvcc on PATH, else under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda; or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME)")


def nvcc_build(src_dir, out_dir, archs=ARCHS):
    """Compile src_dir/tm_kernels.cu for ``archs`` in one nvcc call → CompletedProcess."""
    cmd = [
        NVCC,
        "-std=c++17",  # the options CuPy's RawModule passes (cupy_backend._module)
        f"-I{src_dir}",
        *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs],
        f"--threads={len(archs)}",  # the architectures in parallel
        "-fatbin",
        "--no-compress",
        "--resource-usage",
        "-o",
        os.path.join(out_dir, "tm_kernels.fatbin"),
        os.path.join(src_dir, "tm_kernels.cu"),
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=out_dir)
    proc.seconds = time.perf_counter() - t0
    proc.cmd = " ".join(cmd)
    return proc


def compiled_entries(output):
    """{(entry function, sm)} that ptxas reports compiling."""
    pat = r"Compiling entry function '(\w+)' for 'sm_(\d+)'"
    return {(name, int(sm)) for name, sm in re.findall(pat, output)}


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    out = tmp_path_factory.mktemp("nvcc")
    proc = nvcc_build(kernel_dir(), str(out))
    print(f"nvcc sm_{'/sm_'.join(map(str, ARCHS))}: {proc.seconds:.1f} s wall")
    return proc, out


@needs_nvcc
def test_every_kernel_compiles_for_sm80_and_sm90(build):
    proc, out = build
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed ({proc.cmd}):\n{output}"
    entries = compiled_entries(output)
    want = {(k, a) for k in KERNELS for a in ARCHS}
    missing = sorted(want - entries)
    assert not missing, f"entries not compiled: {missing}\n{output}"
    # every __global__ function is one the Python side knows how to launch
    unknown = sorted({k for k, _ in entries} - set(KERNELS))
    assert not unknown, f"kernels missing from backends.abi.KERNELS: {unknown}"
    # the fatbinary holds one uncompressed ELF per architecture with every extern "C" name
    blob = (out / "tm_kernels.fatbin").read_bytes()
    assert blob.count(b"\x7fELF") >= len(ARCHS)
    for k in KERNELS:
        assert blob.count(k.encode() + b"\0") >= len(ARCHS), k
    spills = re.findall(
        r"Function properties for (\w+)\n\s+\d+ bytes stack frame, (\d+) bytes spill", output
    )
    print("register spills (bytes):", {k: int(s) for k, s in spills if int(s)})
    warnings = [ln for ln in output.splitlines() if "warning" in ln.lower()]
    print("\n".join(warnings) or "no compiler warnings")


CUTOFF_KERNELS = ("tm_cutoff_list", "tm_cutoff_primal", "tm_cutoff_zeta", "tm_cutoff_zeta_xonly")


@needs_nvcc
def test_cutoff_list_kernels_compile_for_both_architectures(build):
    # the Verlet-list kernels of cutoff.cuh (issue 20) are entries the Python side knows,
    # compiled for sm_80 and sm_90; their registers and spills are reported (the ζ passes
    # carry PCHUNK tangents in registers, as the all-pairs ones do)
    proc, _ = build
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    assert set(CUTOFF_KERNELS) <= set(KERNELS)
    entries = compiled_entries(output)
    assert {(k, a) for k in CUTOFF_KERNELS for a in ARCHS} <= entries
    usage = re.findall(
        r"Function properties for (tm_cutoff\w+)\n\s+\d+ bytes stack frame, (\d+) bytes spill"
        r"[^\n]*\n[^\n]*Used (\d+) registers",
        output,
    )
    assert len(usage) == len(CUTOFF_KERNELS) * len(ARCHS), usage
    print("cutoff kernels (name, spill bytes, registers):", usage)


def broken_copy(tmp_path, header, marker, line):
    """A copy of the kernel sources with ``line`` added after ``marker`` in ``header``."""
    src = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), src)
    path = src / header
    text = path.read_text()
    assert marker in text
    path.write_text(text.replace(marker, f"{marker}\n{line}", 1))
    return src


@needs_nvcc
def test_a_kernel_that_does_not_compile_fails_with_the_compiler_output(tmp_path):
    # the check above can fail: a type error in one header is reported, naming the file
    src = broken_copy(tmp_path, "bonded.cuh", "namespace tmk {", "static const double x = nullptr;")
    proc = nvcc_build(str(src), str(tmp_path), archs=(80,))
    assert proc.returncode != 0
    assert "bonded.cuh" in proc.stderr + proc.stdout
    assert not compiled_entries(proc.stdout + proc.stderr)


# ------------------------------------------------------------------------------ NVRTC


def find_nvrtc():
    """Path of libnvrtc.so: the nvidia-cuda-nvrtc wheel (CUDA 13 or 12 layout), else the
    toolkit under $CUDA_HOME / $CUDA_PATH / /usr/local/cuda; or None."""
    roots = []
    spec = importlib.util.find_spec("nvidia")
    if spec is not None and spec.submodule_search_locations:
        for root in spec.submodule_search_locations:
            roots += [os.path.join(root, "cu13", "lib"), os.path.join(root, "cuda_nvrtc", "lib")]
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home:
            roots.append(os.path.join(home, "lib64"))
    for root in roots:
        found = sorted(glob.glob(os.path.join(root, "libnvrtc.so*")))
        if found:
            return found[0]
    return None


NVRTC = find_nvrtc()


@pytest.fixture(scope="module")
def nvrtc():
    if NVRTC is None:
        pytest.skip("libnvrtc not found (pip install nvidia-cuda-nvrtc, or a CUDA toolkit)")
    # libnvrtc dlopens its builtins by soname; load them first from the same folder
    for builtins in glob.glob(os.path.join(os.path.dirname(NVRTC), "libnvrtc-builtins.so*")):
        if ".alt." not in builtins:
            ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(NVRTC)


def nvrtc_compile(lib, src_dir, arch, out_dir):
    """Compile src_dir/tm_kernels.cu with NVRTC as CuPy's RawModule does → (rc, log, code).

    ``arch`` is "compute_80" (PTX) or "sm_90" (cubin); code is the PTX text or the cubin."""
    code = open(os.path.join(src_dir, "tm_kernels.cu"), "rb").read()
    prog = ctypes.c_void_p()
    rc = lib.nvrtcCreateProgram(ctypes.byref(prog), code, b"tm_kernels.cu", 0, None, None)
    assert rc == 0, f"nvrtcCreateProgram: {rc}"
    try:
        # what cupy.cuda.compiler adds to ours: the architecture, -ftz and -default-device
        cupy_adds = (f"-arch={arch}", "-ftz=true", "--device-as-default-execution-space")
        major, minor = ctypes.c_int(), ctypes.c_int()
        lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
        if (major.value, minor.value) >= (12, 8):
            cupy_adds += ("--pch",)  # CuPy asks NVRTC 12.8+ for precompiled headers
        # NVRTC writes its automatic precompiled headers under the working directory
        opts = [o.encode() for o in nvrtc_options(src_dir, cupy_adds) + (f"--pch-dir={out_dir}",)]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        out = b""
        if rc == 0:
            get_size, get = (
                (lib.nvrtcGetPTXSize, lib.nvrtcGetPTX)
                if arch.startswith("compute")
                else (lib.nvrtcGetCUBINSize, lib.nvrtcGetCUBIN)
            )
            get_size(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            get(prog, buf)
            out = buf.raw
        return rc, log.value.decode(errors="replace"), out
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("arch", ["compute_80", "sm_90"])
def test_nvrtc_compiles_every_kernel_with_cupys_options(nvrtc, arch, tmp_path):
    t0 = time.perf_counter()
    rc, log, out = nvrtc_compile(nvrtc, kernel_dir(), arch, str(tmp_path))
    print(f"NVRTC {arch}: {time.perf_counter() - t0:.1f} s")
    assert rc == 0, f"NVRTC {arch} failed (error {rc}):\n{log}"
    assert "error" not in log.lower(), log
    if arch.startswith("compute"):
        ptx = out.decode()
        assert ".target sm_80" in ptx
        entries = set(re.findall(r"\.visible \.entry (\w+)\(", ptx))
        assert entries == set(KERNELS), sorted(entries ^ set(KERNELS))
        # float64 throughout: no single-precision arithmetic anywhere in the kernels
        assert not re.search(r"\b(add|mul|fma\.rn|div\.rn)\.f32\b", ptx)
    else:
        assert out.startswith(b"\x7fELF")
        for k in KERNELS:
            assert k.encode() + b"\0" in out, k


def test_nvrtc_rejects_what_only_nvcc_accepts(nvrtc, tmp_path):
    # NVRTC has no C++ standard library: a header that nvcc would compile fails here, so
    # the test above checks more than the nvcc build does
    src = broken_copy(tmp_path, "philox.cuh", "#pragma once", "#include <cstdint>")
    rc, log, _ = nvrtc_compile(nvrtc, str(src), "compute_80", str(tmp_path))
    assert rc != 0
    assert "cstdint" in log, log


def test_nvrtc_reports_an_error_in_the_cutoff_header(nvrtc, tmp_path):
    # cutoff.cuh is part of what NVRTC compiles: a type error there fails the build and
    # the log names the header
    src = broken_copy(tmp_path, "cutoff.cuh", "namespace tmk {", "static const double x = nullptr;")
    rc, log, _ = nvrtc_compile(nvrtc, str(src), "compute_80", str(tmp_path))
    assert rc != 0
    assert "cutoff.cuh" in log, log


# ------------------------------------------------------------------------------ packaging


def test_a_built_package_ships_the_kernels_and_finds_them(tmp_path):
    # setup.py's build_py copies cuda/kernels into the package (a wheel holds what build_py
    # wrote): every source is there byte for byte, and kernel_dir() of the built package
    # (not the source tree) points at the copy
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    lib = tmp_path / "lib"
    proc = subprocess.run(
        [sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    src = os.path.join(root, "cuda", "kernels")
    shipped = lib / "timemachine" / "backends" / "_kernels"
    sources = [
        os.path.relpath(p, src)
        for pattern in ("*.cu", "*.cuh", "*.cpp")
        for p in glob.glob(os.path.join(src, "**", pattern), recursive=True)
    ]
    assert "tm_kernels.cu" in sources and os.path.join("host", "tm_xla_cpu.cpp") in sources
    for rel in sources:
        assert (shipped / rel).read_bytes() == open(os.path.join(src, rel), "rb").read(), rel
    found = subprocess.run(
        [sys.executable, "-c", "from timemachine.backends import kernel_dir; print(kernel_dir())"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(lib)},
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip() == str(shipped)
