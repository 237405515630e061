"""Speed measurements: the machine, the model's compute floor, inference latency/throughput, runtime tuning,
preprocessing cost. Library for ``bench/run_all.py``; every function returns plain dicts (JSON-ready).

Timing rules: warm-up calls are excluded; engines are measured in interleaved rounds (engine A, B, C, A,
B, C, ...) so a neighbour's burst of load on a shared machine hits all of them alike; the figure reported
is the median over all timed calls, throughput = batch / median latency.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

INT8_RATE_SIZE = 1024


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, the ISA extensions that matter for inference, library versions."""
    import onnxruntime as ort

    cpu, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown CPU":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
           if f in flags]
    return {"cpu": cpu, "cores_usable": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "isa": isa,
            "machine": platform.machine(), "python": platform.python_version(), "onnxruntime": ort.__version__,
            "numpy": np.__version__, "load_avg_at_start": loadavg()}


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def timed_median(fn: Callable[[], Any], calls: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``calls`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sgemm_gflops(n: int = 2048, repeats: int = 7) -> dict[str, float]:
    """Measured float32 matrix-multiply rate (GFLOP/s) with numpy (its BLAS) and torch, all usable cores."""
    rng = np.random.default_rng(0)
    a, b = rng.random((n, n), np.float32), rng.random((n, n), np.float32)
    flops = 2.0 * n ** 3
    out = {"numpy_sgemm": flops / timed_median(lambda: a @ b, repeats, 2) / 1e9}
    try:
        import torch

        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        with torch.inference_mode():
            out["torch_sgemm"] = flops / timed_median(lambda: torch.mm(ta, tb), repeats, 2) / 1e9
    except ImportError:
        pass
    return out


def ort_int8_gemm_gops(n: int = INT8_RATE_SIZE, threads: int = 0, repeats: int = 7) -> float:
    """Measured uint8 x int8 matrix-multiply rate of ONNX Runtime (MatMulInteger, GOP/s): the INT8 ceiling
    that the quantised convolutions run on (VNNI where the CPU has it)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "mmi",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n]),
                           helper.make_tensor_value_info("B", TensorProto.INT8, [n, n])],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feed = {"A": rng.integers(0, 255, (n, n), dtype=np.uint8), "B": rng.integers(-127, 127, (n, n), dtype=np.int8)}
    return 2.0 * n ** 3 / timed_median(lambda: sess.run(None, feed), repeats, 2) / 1e9


# --------------------------------------------------------------------------- compute floor


def count_macs(onnx_path: str | os.PathLike, batch: int = 1) -> dict[str, Any]:
    """Multiply-accumulates of one forward pass, from the graph: Conv (incl. depthwise) and Gemm/MatMul.

    Shapes come from ONNX shape inference with the batch fixed; elementwise ops, pooling and activations
    are not counted (they are memory-bound, not compute-bound).
    """
    import onnx

    model = onnx.load(str(onnx_path))
    for vi in model.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
    model = onnx.shape_inference.infer_shapes(model)
    shapes: dict[str, list[int]] = {}
    for vi in [*model.graph.value_info, *model.graph.input, *model.graph.output]:
        shapes[vi.name] = [d.dim_value for d in vi.type.tensor_type.shape.dim]
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)
    by_op: dict[str, int] = {}
    depthwise = 0
    for node in model.graph.node:
        macs = 0
        if node.op_type == "Conv":
            w, y = shapes.get(node.input[1]), shapes.get(node.output[0])
            if not w or not y:
                raise ValueError(f"no shape for Conv {node.name}")
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            macs = int(np.prod(y)) * w[1] * int(np.prod(w[2:]))
            if group > 1 and group == y[1]:
                depthwise += macs
        elif node.op_type in ("Gemm", "MatMul"):
            a, y = shapes.get(node.input[0]), shapes.get(node.output[0])
            if not a or not y:
                raise ValueError(f"no shape for {node.op_type} {node.name}")
            trans_a = next((a_.i for a_ in node.attribute if a_.name == "transA"), 0)
            k = a[-2] if trans_a else a[-1]
            macs = int(np.prod(y)) * k
        if macs:
            by_op[node.op_type] = by_op.get(node.op_type, 0) + macs
    total = sum(by_op.values())
    return {"batch": batch, "macs": total, "gflops": 2 * total / 1e9, "by_op": by_op, "depthwise_macs": depthwise}


# --------------------------------------------------------------------------- inference engines


def ort_session(path: str | os.PathLike, threads: int, graph_optimization: str = "all", spinning: bool = True):
    from pipeline.runtime import RuntimeOptions, create_session

    opts = RuntimeOptions(providers=["CPUExecutionProvider"], intra_op_threads=threads,
                          graph_optimization=graph_optimization, allow_spinning=spinning)
    return create_session(Path(path).read_bytes(), opts)


def ort_runner(sess) -> Callable[[np.ndarray], Any]:
    return lambda x: sess.run(None, {"images": x})


def ort_iobinding_runner(sess, batch: int, n_classes: int, emb_dim: int) -> Callable[[np.ndarray], Any]:
    """IO binding on CPU: outputs written into buffers allocated once, input bound without a copy."""
    import onnxruntime as ort

    binding = sess.io_binding()
    outs = {o.name: np.empty((batch, n_classes if o.name == "probs" else emb_dim), np.float32)
            for o in sess.get_outputs()}
    for name, arr in outs.items():
        binding.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(arr))

    def run(x: np.ndarray) -> Any:
        binding.bind_cpu_input("images", x)
        sess.run_with_iobinding(binding)
        return outs

    return run


def torch_runner(run_dir: Path, threads: int) -> Callable[[np.ndarray], Any]:
    """Torch eager inference of the run's checkpoint (what training runs), ``threads`` intra-op threads."""
    import torch

    from pipeline.metadata import load_metadata
    from pipeline.train import CHECKPOINT_FILE, ExportModule, classifier_for, load_checkpoint

    torch.set_num_threads(threads)
    meta = load_metadata(run_dir / "model.onnx")
    clf = classifier_for(meta)
    clf.load_state_dict(load_checkpoint(run_dir / CHECKPOINT_FILE))
    module = ExportModule(clf).eval()

    def run(x: np.ndarray) -> Any:
        with torch.inference_mode():
            return module(torch.from_numpy(x))

    return run


ENGINE_SWITCH_PAUSE_S = 0.2  # longer than OpenMP's / ONNX Runtime's spin-wait before threads sleep


def interleaved_latency(runners: dict[str, Callable[[np.ndarray], Any]], x: np.ndarray, calls: int,
                        warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    """Per engine: median / p10 / p90 latency (ms) of one call on ``x``, measured in interleaved rounds.

    Between engines a short pause and one untimed call: the previous engine's idle threads (OpenMP's and
    ONNX Runtime's spin-wait after a call) must not run beside the next engine's timed calls on a small
    machine (on 2 cores that made INT8 batch-1 medians swing between 3 and 7 ms).
    """
    for fn in runners.values():
        for _ in range(warmup):
            fn(x)
    times: dict[str, list[float]] = {k: [] for k in runners}
    per_round = max(1, calls // rounds)
    for _ in range(rounds):
        for name, fn in runners.items():
            time.sleep(ENGINE_SWITCH_PAUSE_S)
            fn(x)
            for _ in range(per_round):
                t = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - t) * 1000.0)
    out = {}
    for name, ts in times.items():
        q = np.percentile(ts, [10, 50, 90])
        out[name] = {"median_ms": float(q[1]), "p10_ms": float(q[0]), "p90_ms": float(q[2]), "calls": len(ts)}
    return out


def latency_table(run_dir: Path, int8_path: Path | None, batches: list[int], threads: int, calls: int,
                  warmup: int, rounds: int, torch_eager: bool = True) -> dict[str, Any]:
    """Torch eager vs ORT fp32 vs ORT INT8 at each batch size, same input, same thread count."""
    from pipeline.metadata import load_metadata

    meta = load_metadata(run_dir / "model.onnx")
    spec = meta.preprocess
    runners: dict[str, Callable[[np.ndarray], Any]] = {}
    if torch_eager:
        runners["torch eager"] = torch_runner(run_dir, threads)
    runners["ORT fp32"] = ort_runner(ort_session(run_dir / "model.onnx", threads))
    if int8_path is not None:
        runners["ORT INT8"] = ort_runner(ort_session(int8_path, threads))
    rng = np.random.default_rng(0)
    rows = {}
    for b in batches:
        x = rng.normal(0, 1, (b, 3, spec.height, spec.width)).astype(np.float32)
        n = max(5, calls // b) if b > 1 else calls  # big batches: fewer calls, same order of images
        res = interleaved_latency(runners, x, n, warmup, min(rounds, n))
        for r in res.values():
            r["images_per_s"] = b / (r["median_ms"] / 1000.0)
            r["ms_per_image"] = r["median_ms"] / b
        rows[str(b)] = res
    return {"threads": threads, "input": f"{spec.height}x{spec.width}", "backbone": meta.backbone, "batches": rows}


def cpu_ms_single_thread(run_dir: Path, int8_path: Path | None, calls: int, warmup: int,
                         torch_eager: bool = True) -> dict[str, float]:
    """Median process CPU time (ms) of one batch-1 call with one thread per engine.

    With one thread, CPU time is the compute the call needs: unlike wall time it is not inflated when
    other processes share the cores, so it is the figure to trust on a busy machine.
    """
    from pipeline.metadata import load_metadata

    spec = load_metadata(run_dir / "model.onnx").preprocess
    x = np.random.default_rng(3).normal(0, 1, (1, 3, spec.height, spec.width)).astype(np.float32)
    runners: dict[str, Callable[[np.ndarray], Any]] = {}
    prev_torch = None
    if torch_eager:
        import torch

        prev_torch = torch.get_num_threads()
        runners["torch eager"] = torch_runner(run_dir, 1)
    runners["ORT fp32"] = ort_runner(ort_session(run_dir / "model.onnx", 1))
    if int8_path is not None:
        runners["ORT INT8"] = ort_runner(ort_session(int8_path, 1))
    out = {}
    try:
        for name, fn in runners.items():
            for _ in range(warmup):
                fn(x)
            times = []
            for _ in range(calls):
                c = time.process_time()
                fn(x)
                times.append((time.process_time() - c) * 1000.0)
            out[name] = statistics.median(times)
    finally:
        if prev_torch is not None:
            import torch

            torch.set_num_threads(prev_torch)
    return out


def tuning_table(fp32: Path, int8: Path | None, threads_list: list[int], calls: int, warmup: int,
                 rounds: int) -> dict[str, Any]:
    """Batch-1 latency per graph-optimisation level and thread count, and IO binding vs plain run."""
    from pipeline.metadata import load_metadata

    meta = load_metadata(fp32)
    spec = meta.preprocess
    x1 = np.random.default_rng(1).normal(0, 1, (1, 3, spec.height, spec.width)).astype(np.float32)
    models = {"fp32": fp32, **({"int8": int8} if int8 is not None else {})}
    levels = ["disable", "basic", "extended", "all"]
    grid: dict[str, dict[str, float]] = {}
    for name, path in models.items():
        for threads in threads_list:
            runners = {lvl: ort_runner(ort_session(path, threads, lvl)) for lvl in levels}
            res = interleaved_latency(runners, x1, calls, warmup, rounds)
            grid[f"{name} / {threads} thread{'s' if threads > 1 else ''}"] = {
                lvl: r["median_ms"] for lvl, r in res.items()}
    binding: dict[str, dict[str, float]] = {}
    threads = max(threads_list)
    for name, path in models.items():
        for b in (1, 8):
            sess = ort_session(path, threads)
            x = np.random.default_rng(2).normal(0, 1, (b, 3, spec.height, spec.width)).astype(np.float32)
            res = interleaved_latency({"run": ort_runner(sess), "io_binding": ort_iobinding_runner(
                sess, b, len(meta.classes), meta.embedding_dim)}, x, max(5, calls // b), warmup, rounds)
            binding[f"{name} batch {b}"] = {k: v["median_ms"] for k, v in res.items()}
    spin: dict[str, dict[str, float]] = {}
    for name, path in models.items():  # idle intra-op threads spin by default: fast alone, costly when shared
        res = interleaved_latency({"spinning": ort_runner(ort_session(path, threads)),
                                   "no spinning": ort_runner(ort_session(path, threads, spinning=False))},
                                  x1, calls, warmup, rounds)
        spin[f"{name} batch 1"] = {k: v["median_ms"] for k, v in res.items()}
    return {"graph_optimization": grid, "io_binding": binding, "spinning": spin, "threads_for_io_binding": threads}


# --------------------------------------------------------------------------- preprocessing


def preprocessing_cost(spec, real_files: list[Path], repeats: int = 3) -> dict[str, dict[str, float]]:
    """Per-image ms of decode, resize and normalise, separately, for real line images and camera-sized JPEGs.

    Single-threaded (one decode thread), which is what one daemon worker spends per image. Where the
    spec supports JPEG decoding at reduced scale (``jpeg_scaled_decode``), camera frames are measured
    with it off and on. Real line images are also measured as the daemon handles them: a grey image
    kept as one channel until after the resize (``keep_grey``; the same pixels).
    """
    import cv2

    from pipeline.data.decode import decode_bytes
    from pipeline.preprocess import normalize, resize_image

    rng = np.random.default_rng(0)
    sets: dict[str, list[bytes]] = {}
    if real_files:
        sets[f"magnetic-tile JPEG (~{_typical_size(real_files)})"] = [p.read_bytes() for p in real_files]
    for w, h in ((640, 480), (1920, 1080)):
        base = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h),
                          interpolation=cv2.INTER_CUBIC)
        frames = []
        for i in range(16):
            img = cv2.add(base, rng.integers(0, 16, base.shape, dtype=np.uint8))
            frames.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
        sets[f"camera JPEG {w}x{h}"] = frames
    runs = [(name, blobs, spec, False) for name, blobs in sets.items()]
    if "jpeg_scaled_decode" in type(spec).model_fields and not spec.jpeg_scaled_decode:
        scaled = spec.model_copy(update={"jpeg_scaled_decode": True})
        runs += [(f"{name}, jpeg_scaled_decode", blobs, scaled, False) for name, blobs in sets.items()
                 if "camera" in name]
    if real_files:
        runs += [(f"{name}, daemon (grey kept one channel)", blobs, spec, True) for name, blobs in sets.items()
                 if "magnetic" in name]
    prev = cv2.getNumThreads()
    cv2.setNumThreads(1)
    out = {}
    try:
        for name, blobs, run_spec, keep_grey in runs:
            decode_ms, resize_ms, norm_ms = [], [], []
            kwargs = {"spec": run_spec} if "jpeg_scaled_decode" in type(spec).model_fields else {}
            if keep_grey:
                kwargs["keep_grey"] = True
            for _ in range(repeats):
                for data in blobs:
                    t0 = time.perf_counter()
                    img = decode_bytes(data, **kwargs)
                    t1 = time.perf_counter()
                    small = resize_image(img, run_spec)
                    t2 = time.perf_counter()
                    normalize(small[None], run_spec)
                    t3 = time.perf_counter()
                    decode_ms.append((t1 - t0) * 1000)
                    resize_ms.append((t2 - t1) * 1000)
                    norm_ms.append((t3 - t2) * 1000)
            d, r, n = (statistics.median(v) for v in (decode_ms, resize_ms, norm_ms))
            out[name] = {"decode_ms": d, "resize_ms": r, "normalize_ms": n, "total_ms": d + r + n,
                         "images": len(blobs)}
    finally:
        cv2.setNumThreads(prev)
    return out


def _typical_size(files: list[Path]) -> str:
    import cv2

    sizes = []
    for p in files[:20]:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        if img is not None:
            sizes.append(img.shape[:2])
    if not sizes:
        return "?"
    h, w = (int(statistics.median(v)) for v in zip(*sizes))
    return f"{w}x{h}"
