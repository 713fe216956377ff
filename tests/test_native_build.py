"""The native extensions are built and installed as the package promises, and the runtime stays torch-free."""

from __future__ import annotations

import importlib
import subprocess
import sys

import numpy as np
import pytest

from pauserec.runtime.trie_topk import available_impls


def test_cpu_extension_is_built():
    cpu = importlib.import_module("pauserec._trie_topk_cpu")
    assert isinstance(cpu.built_with_cuda, bool)
    assert cpu.MAX_K == 1 << 20
    assert "cpu" in available_impls()


def test_cuda_extension_matches_build_flag():
    cpu = importlib.import_module("pauserec._trie_topk_cpu")
    if not cpu.built_with_cuda:
        with pytest.raises(ImportError):
            importlib.import_module("pauserec._trie_topk_cuda")
        assert "cuda" not in available_impls()
        return
    cuda = importlib.import_module("pauserec._trie_topk_cuda")  # imports with or without a GPU
    archs = cuda.built_archs()  # from PAUSEREC_CUDA_ARCHS / CMAKE_CUDA_ARCHITECTURES at build time
    assert archs["sass"] and archs["ptx"] and max(archs["ptx"]) == max(archs["sass"])
    assert all(a >= 75 for a in archs["sass"])
    assert issubclass(cuda.CudaError, RuntimeError)
    usable = cuda.cuda_available()
    assert isinstance(usable, bool)
    assert usable == ("cuda" in available_impls())
    if not usable:
        assert cuda.unavailable_reason()
        with pytest.raises(RuntimeError, match="impl='cpu'"):
            cuda.trie_topk(np.zeros((1, 1), np.float32), np.zeros((1, 1, 2), np.float32), np.zeros((1, 1), np.int32),
                           np.array([0, 0], np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32), 1)
        with pytest.raises(cuda.CudaError, match="no usable CUDA device|no CUDA device|test launch|no code"):
            cuda.DeviceTrie(np.array([0, 0], np.int32), np.zeros(0, np.int32), np.zeros(0, np.int32))
        with pytest.raises(cuda.CudaError):
            cuda.DeviceArray([4], "float32")


def test_runtime_kernel_does_not_import_torch():
    code = ("import sys, numpy as np; from pauserec.runtime.trie_topk import trie_topk, available_impls; "
            "available_impls(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_default_cuda_targets_are_documented():
    """CMakeLists.txt builds SASS for 75/80/86/89/90 and PTX for the highest unless told otherwise."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "CMakeLists.txt").read_text()
    assert 'set(PAUSEREC_CUDA_ARCHS "75;80;86;89;90"' in text and "PAUSEREC_CUDA_ARCHS=87" in text
