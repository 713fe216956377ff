"""Memory the runtime hands back (mapped weight pages no kernel reads after a prepacked load) and what it may take."""

from __future__ import annotations

import mmap
import os
import sys
import time

import numpy as np
import pytest

from pauserec.errors import DataError
from pauserec.runtime.memory import (_file_mappings, available_bytes, drop_mapped_pages, dropping_mapped_pages,
                                     parse_size)

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")


def _resident_kb(path) -> list[int]:
    """Rss (kB) of each of this process's mappings of ``path``, in address order."""
    target, out, current = os.path.realpath(path), [], False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if head and "-" in head[0] and ":" not in head[0]:
                current = len(head) == 6 and head[5].rstrip("\n") == target
            elif current and line.startswith("Rss:"):
                out.append(int(line.split()[1]))
    return out


@linux
def test_drops_clean_pages_and_keeps_written_ones(tmp_path):
    data = np.random.default_rng(0).integers(0, 256, 4 << 20, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    data.tofile(path)
    with open(path, "rb") as f:
        clean = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        written = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    for m in (clean, written):
        assert np.array_equal(np.frombuffer(m, np.uint8), data)  # every page read: resident
    written[4096] = (int(data[4096]) + 1) % 256  # a copy-on-write page: only this mapping has it
    before = _resident_kb(path)
    assert len(before) == 2 and min(before) > 0

    dropped = drop_mapped_pages(path)

    assert dropped == 4 << 20  # the clean mapping only
    after = _resident_kb(path)
    assert sorted(after)[0] == 0 and sorted(after)[1] in before  # the written mapping kept what it had
    assert written[4096] == (int(data[4096]) + 1) % 256  # the written page kept its value
    assert np.array_equal(np.frombuffer(clean, np.uint8), data)  # the dropped pages read back from the file
    assert drop_mapped_pages(tmp_path / "other.bin") == 0  # a file nobody maps: nothing
    clean.close()
    written.close()


@linux
def test_pages_are_dropped_while_the_block_runs(tmp_path):
    """What a reader inside the block (ONNX Runtime opening a session) has read is dropped before the block ends,
    and again once it has; the bytes read back the same."""
    data = np.random.default_rng(1).integers(0, 256, 8 << 20, dtype=np.uint8)
    path = tmp_path / "weights.bin"
    data.tofile(path)
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    with dropping_mapped_pages(path, every=0.01):
        assert np.array_equal(mapped, data)  # every page read: resident
        deadline = time.monotonic() + 10
        while sum(_resident_kb(path)) > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sum(_resident_kb(path)) == 0  # dropped while the block still runs
        assert np.array_equal(mapped, data)  # read back from the file
    assert sum(_resident_kb(path)) == 0  # and once more when it ends
    del mapped


def test_reads_mapping_headers_and_anonymous_pages():
    smaps = ("7f00-7f10 r--p 00000000 fe:00 12 /e/weights.bin\nRss: 4 kB\nAnonymous: 0 kB\nVmFlags: rd\n"
             "7f10-7f20 rw-p 00001000 fe:00 12 /e/weights.bin\nAnonymous: 8 kB\n"
             "7f20-7f30 rw-p 00000000 00:00 0 \nAnonymous: 4 kB\n"
             "7f30-7f40 r--p 00000000 fe:00 13 /e/weights.bin.bak\nAnonymous: 0 kB\n")
    assert list(_file_mappings(smaps, "/e/weights.bin")) == [(0x7f00, 0x7f10, 0), (0x7f10, 0x7f20, 8)]


def _touch(path) -> None:
    """Read every page of this process's mappings of ``path`` (through /proc/self/mem): all resident."""
    target = os.path.realpath(path)
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].rstrip("\n") == target:
                start, end = (int(x, 16) for x in parts[0].split("-"))
                mem.seek(start)
                mem.read(end - start)


@linux
def test_a_prepacked_engine_keeps_no_weight_pages_it_does_not_read(tmp_path_factory, monkeypatch):
    """int4: ONNX Runtime packs each MatMulNBits' scales into its own buffer but keeps the mapped originals, read
    once at load. Engine.load drops such pages; dropping every page of a live engine's weights changes nothing."""
    pytest.importorskip("torch")
    from test_export import exported

    import pauserec.runtime.memory
    from pauserec.runtime import Engine, Recommender
    from pauserec.runtime.weights import WEIGHTS_FILE

    path = exported(tmp_path_factory, "qwen3", "pause", "-batch-int4", precision="int4", quant_sample=4,
                    min_agreement=0.0)
    histories = [["item1", "item5"], ["item7", "item2", "item9"]]
    dropped = []
    real = pauserec.runtime.memory.drop_mapped_pages
    monkeypatch.setattr(pauserec.runtime.memory, "drop_mapped_pages", lambda p: dropped.append(p) or 0)
    engine = Engine.load(path, provider="cpu")  # int4: prepacked
    assert dropped and set(dropped) == {path / WEIGHTS_FILE}  # the load hands the weight pages back
    want = Recommender(engine).recommend(histories, k=10, beams=10)
    _touch(path / WEIGHTS_FILE)
    assert sum(_resident_kb(path / WEIGHTS_FILE)) > 0
    real(path / WEIGHTS_FILE)
    assert sum(_resident_kb(path / WEIGHTS_FILE)) == 0
    got = Recommender(engine).recommend(histories, k=10, beams=10)
    np.testing.assert_array_equal(got.items, want.items)
    np.testing.assert_array_equal(got.scores, want.scores)


_CAST_CALL = """
import sys
import numpy as np
import onnxruntime as ort
from pauserec.runtime.backends.ort import disabled_optimizers, session_options

def status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

before = status_kb("VmRSS")
runtime = sys.argv[2] == "runtime"  # the runtime's options for such engines, or ONNX Runtime's defaults
sess = ort.InferenceSession(sys.argv[1], session_options(2, cast_weights=runtime), providers=["CPUExecutionProvider"],
                            disabled_optimizers=disabled_optimizers(runtime))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS starts again from the current RSS (ru_maxrss would keep the parent's, too)
loaded = status_kb("VmRSS")
x = np.ones((1, 2048), np.float16 if sys.argv[3] == "fp16" else np.float32)
sess.run(None, {"run": np.array(True), "x": x})
print((loaded - before) * 1024, (status_kb("VmHWM") - loaded) * 1024)
"""


def _cast_weights_model(path: Path, kind: str, layers: int = 16, width: int = 2048) -> tuple[int, int]:
    """A merged-engine-like model (its weights read by an ``If`` branch) of ``layers`` products by 16-bit weights:
    "fp16" (the CPU provider casts them), "bf16" (cast as ``quantize.bf16_graph`` casts them) or "bf16-cast" (a
    plain Cast of each weight). Returns (16-bit weight bytes, bytes of one float32 copy)."""
    import ml_dtypes
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from pauserec.export.quantize import _widen

    rng = np.random.default_rng(0)
    values = [(rng.standard_normal((width, width)) * 0.02).astype(np.float32) for _ in range(layers)]
    nodes = []
    if kind == "fp16":
        weights = [numpy_helper.from_array(v.astype(np.float16), f"w{i}") for i, v in enumerate(values)]
        nodes = [helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"w{i}"], [f"h{i}"])
                 for i in range(layers)]
        io_type = TensorProto.FLOAT16
    else:  # each product followed by a bias, as in a decoder: ONNX Runtime fuses such readers into new nodes
        weights = [helper.make_tensor(f"w{i}", TensorProto.BFLOAT16, [width, width],
                                      v.astype(ml_dtypes.bfloat16).view(np.uint16).tobytes(), raw=True)
                   for i, v in enumerate(values)] + [numpy_helper.from_array(np.zeros(width, np.float32), "bias")]
        made = set()
        for i in range(layers):
            matmul = helper.make_node("MatMul", ["x" if i == 0 else f"h{i - 1}", f"c{i}"], [f"m{i}"])
            nodes += (_widen(f"w{i}", f"c{i}", [width, width], matmul, {"bias"}, made) if kind == "bf16" else
                      [helper.make_node("Cast", [f"w{i}"], [f"c{i}"], to=TensorProto.FLOAT)])
            nodes += [matmul, helper.make_node("Add", [f"m{i}", "bias"], [f"h{i}"])]
        io_type = TensorProto.FLOAT
    value = lambda name, shape=None: helper.make_tensor_value_info(name, io_type, shape)  # noqa: E731
    branch = helper.make_graph(nodes, "then", [], [value(f"h{layers - 1}")])
    empty = helper.make_graph([helper.make_node("Identity", ["x"], ["y0"])], "else", [], [value("y0")])
    graph = helper.make_graph([helper.make_node("If", ["run"], ["y"], then_branch=branch, else_branch=empty)], "g",
                              [helper.make_tensor_value_info("run", TensorProto.BOOL, []), value("x", [1, width])],
                              [value("y")], weights)
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path),
                    save_as_external_data=True, location=path.stem + ".bin", size_threshold=0)
    return layers * width * width * 2, width * width * 4


def _call_peaks(path: Path, options: str, io: str) -> int:
    """A fresh process's RSS growth as it loads ``path`` plus its peak above that in one call."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _CAST_CALL, str(path), options, io], capture_output=True, text=True,
                         check=True)
    return sum(int(v) for v in out.stdout.split()[-2:])


@linux
def test_an_fp16_engines_float32_weight_copies_live_one_at_a_time(tmp_path):
    """The CPU provider has no float16 MatMul: it casts each fp16 weight to a float32 copy. In the runtime's
    operator order each copy goes before the next is made; in ONNX Runtime's default order all were made first (an
    fp16 engine's first call then took its weights twice over). The weights are read by an ``If`` branch, as in a
    merged engine (the casts of a main-graph weight are folded at load instead)."""
    half_bytes, copy_bytes = _cast_weights_model(tmp_path / "fp16.onnx", "fp16")
    assert _call_peaks(tmp_path / "fp16.onnx", "default", "fp16") > half_bytes + 8 * copy_bytes  # this test can fail
    assert _call_peaks(tmp_path / "fp16.onnx", "runtime", "fp16") < half_bytes + 3 * copy_bytes  # a copy or two alive


@linux
def test_a_bf16_engines_float32_weight_copies_live_one_at_a_time(tmp_path):
    """A bf16 engine's graphs cast their weights themselves. A plain Cast reads nothing computed: constant folding
    makes every copy as the session loads, and without it ONNX Runtime still runs such Casts first once its
    optimizers have fused their readers into new nodes. ``quantize.bf16_graph``'s casts wait for their activations
    and, with the runtime's options, each copy is made as its product runs."""
    half_bytes, copy_bytes = _cast_weights_model(tmp_path / "bf16.onnx", "bf16")
    _cast_weights_model(tmp_path / "bf16-cast.onnx", "bf16-cast")
    for options in ("default", "runtime"):  # plain casts: all copies alive at once (this test can fail)
        assert _call_peaks(tmp_path / "bf16-cast.onnx", options, "bf16") > half_bytes + 8 * copy_bytes
    assert _call_peaks(tmp_path / "bf16.onnx", "runtime", "bf16") < half_bytes + 3 * copy_bytes


def test_cast_weight_engines_alone_run_their_operators_in_priority_order(tmp_path_factory):
    """Priority order for the engines whose weights the CPU provider casts (above); the others keep ONNX Runtime's
    default order, in which an int8 KV engine's prefill encodes each layer's KV before the next layer runs."""
    pytest.importorskip("torch")
    import onnxruntime as ort
    from test_export import exported

    from pauserec.runtime import Engine

    for path, order in ((exported(tmp_path_factory, "qwen3", "pause", "-fp16", precision="fp16", quant_sample=16,
                                  min_agreement=0.5), ort.ExecutionOrder.PRIORITY_BASED),
                        (exported(tmp_path_factory, "qwen3", "pause", "-batch-bf16", precision="bf16", quant_sample=4,
                                  min_agreement=0.0), ort.ExecutionOrder.PRIORITY_BASED),
                        (exported(tmp_path_factory, "qwen2", "direct", "-int8", precision="int8", quant_sample=16,
                                  min_agreement=0.0), ort.ExecutionOrder.DEFAULT)):
        engine = Engine.load(path, provider="cpu")
        orders = {s.sess.get_session_options().execution_order for s in engine.sessions.values()}
        assert orders == {order}, path.name


def _fake_root(tmp_path, files: dict[str, str]):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


MEMINFO = "MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n"


def test_available_memory_is_the_machines_or_what_its_cgroup_leaves(tmp_path):
    """MemAvailable, lowered to what the cgroup limits leave (limit - usage + inactive page cache, at the process's
    own group and every group above it; v2, else v1's memory controller), never raised by a limit above the
    machine's."""
    machine = _fake_root(tmp_path / "m", {"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/\n",
                                          "sys/fs/cgroup/memory.max": "max\n"})
    assert available_bytes(machine) == 20_000_000 * 1024
    v2 = _fake_root(tmp_path / "v2", {"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/job/7\n",
                                      "sys/fs/cgroup/job/7/memory.max": "8000000000\n",
                                      "sys/fs/cgroup/job/7/memory.current": "3000000000\n",
                                      "sys/fs/cgroup/job/7/memory.stat": "anon 1\ninactive_file 1000000000\n"})
    assert available_bytes(v2) == 6_000_000_000
    v1 = _fake_root(tmp_path / "v1", {"proc/meminfo": MEMINFO, "proc/self/cgroup": "4:memory:/docker/x\n",
                                      "sys/fs/cgroup/memory/memory.limit_in_bytes": "4000000000\n",
                                      "sys/fs/cgroup/memory/memory.usage_in_bytes": "3500000000\n",
                                      "sys/fs/cgroup/memory/memory.stat": "total_inactive_file 500000000\n"})
    assert available_bytes(v1) == 1_000_000_000
    unlimited = _fake_root(tmp_path / "u", {"proc/meminfo": MEMINFO, "proc/self/cgroup": "4:memory:/\n",
                                            "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712\n"})
    assert available_bytes(unlimited) == 20_000_000 * 1024
    assert available_bytes(tmp_path / "nothing") is None
    # a group made inside a container's (v1: the container sees its group as the mount's root) under a tighter
    # limit, and a v2 group whose parent's limit binds first: the least of the limits on the way up counts
    nested_v1 = _fake_root(tmp_path / "n1", {"proc/meminfo": MEMINFO, "proc/self/cgroup": "4:memory:/docker/x/box\n",
                                             "sys/fs/cgroup/memory/memory.limit_in_bytes": "9000000000\n",
                                             "sys/fs/cgroup/memory/memory.usage_in_bytes": "5000000000\n",
                                             "sys/fs/cgroup/memory/box/memory.limit_in_bytes": "2000000000\n",
                                             "sys/fs/cgroup/memory/box/memory.usage_in_bytes": "500000000\n"})
    assert available_bytes(nested_v1) == 1_500_000_000
    nested_v2 = _fake_root(tmp_path / "n2", {"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/job/7\n",
                                             "sys/fs/cgroup/job/memory.max": "5000000000\n",
                                             "sys/fs/cgroup/job/memory.current": "4000000000\n",
                                             "sys/fs/cgroup/job/7/memory.max": "max\n"})
    assert available_bytes(nested_v2) == 1_000_000_000
    hybrid = _fake_root(tmp_path / "h", {"proc/meminfo": MEMINFO, "proc/self/cgroup": "4:memory:/box\n0::/\n",
                                         "sys/fs/cgroup/unified/cgroup.procs": "",
                                         "sys/fs/cgroup/memory/box/memory.limit_in_bytes": "3000000000\n"})
    assert available_bytes(hybrid) == 3_000_000_000  # v2 mounted without its memory controller: v1's groups


def test_sizes_are_read_with_their_units():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("1.5 GiB") == 3 << 29 and parse_size("512mb") == 512_000_000
    assert parse_size("4096") == 4096 and parse_size(7) == 7
    for bad in ("lots", "2 GBs", "-1GB", "0"):
        with pytest.raises(DataError, match="size|above zero"):
            parse_size(bad)
