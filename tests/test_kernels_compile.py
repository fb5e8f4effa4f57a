"""nvcc compiles every CUDA kernel for sm_80 (A100) and sm_90 (H100), without a GPU.

One nvcc call builds tm_kernels.cu (the sources that ship with the package,
timemachine.backends.kernel_dir()) for both architectures with -gencode, and ptxas's
resource report (--resource-usage) lists every entry function it compiled for each; the
test fails with the compiler output if the build fails or if an entry the Python side
launches (backends.plan.KERNELS) was not compiled for an architecture. Skipped where nvcc
is absent.
"""

import os
import re
import shutil
import subprocess
import time

import pytest

from timemachine.backends import kernel_dir
from timemachine.backends.plan import KERNELS

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
pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found (PATH, $CUDA_HOME)")


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
    assert not unknown, f"kernels missing from backends.plan.KERNELS: {unknown}"
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


def test_a_kernel_that_does_not_compile_fails_with_the_compiler_output(tmp_path):
    # the check above can fail: a type error in one header is reported, naming the file
    src = tmp_path / "kernels"
    shutil.copytree(kernel_dir(), src)
    path = src / "bonded.cuh"
    text = path.read_text()
    marker = "namespace tmk {"
    assert marker in text
    path.write_text(text.replace(marker, marker + "\nstatic const double broken = nullptr;", 1))
    proc = nvcc_build(str(src), str(tmp_path), archs=(80,))
    assert proc.returncode != 0
    assert "bonded.cuh" in proc.stderr + proc.stdout
    assert not compiled_entries(proc.stdout + proc.stderr)
