"""Inference time per volume on this machine: the PyTorch model vs its ONNX Runtime export vs the MLflow pyfunc
served by `mlflow models serve` (request to answer, preprocessing included), on the real ITK T1 volume, with the
parity of each against PyTorch. Run: python benchmarks/bench_export.py [--repeats 5]."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from medssl.config import EncoderConfig, PreprocessConfig  # noqa: E402
from medssl.export.formats import to_onnx  # noqa: E402
from medssl.export.package import load_package, save_package  # noqa: E402
from medssl.export.pyfunc import ScanClassifier, save_pyfunc  # noqa: E402
from medssl.models.classifier import Classifier  # noqa: E402
from medssl.models.encoders import build_encoder  # noqa: E402

ITK_T1 = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data/KmeansTest_T1UCharRaw.nii.gz")


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--size", type=int, nargs=3, default=[96, 96, 64])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "export_cpu.json")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(tempfile.mkdtemp())
    encoder = EncoderConfig(name="resnet18", width=0.5)
    spec = {"architecture": {"encoder": encoder.model_dump(), "spatial_dims": 3, "img_size": args.size, "n_classes": 2},
            "preprocess": PreprocessConfig(spatial_dims=3, size=args.size, spacing=[2.0, 2.0, 2.0]
                                           ).model_dump(mode="json", exclude={"cache_dir"}),
            "labels": {"column": "lesion", "names": ["healthy", "lesion"], "positive": "lesion"}}
    model = Classifier(build_encoder(encoder, 3, args.size), 2, spatial_dims=3)
    package = load_package(save_package(work / "pkg", model, spec))
    scan = work / "scan"
    scan.mkdir()
    shutil.copy(ITK_T1, scan)
    x = torch.randn(1, 1, *args.size)
    with torch.no_grad():
        want = torch.softmax(package.model(x), 1).numpy()
    import onnxruntime
    session = onnxruntime.InferenceSession(str(to_onnx(package, work / "m.onnx")), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        results = {"machine": f"{os.cpu_count()}-core CPU", "input": [1, 1, *args.size],
                   "encoder": "resnet18 width 0.5", "onnx_max_abs_diff": float(np.abs(got - want).max()),
                   "pytorch_s": _best(lambda: package.model(x), args.repeats),
                   "onnxruntime_s": _best(lambda: session.run(None, {"image": x.numpy()}), args.repeats)}
    in_process = ScanClassifier(package)
    results["pyfunc_in_process_s"] = _best(lambda: in_process.predict([str(scan)]), args.repeats)
    model_dir = save_pyfunc(work / "pkg", work / "served")
    port = _port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", str(model_dir),
                               "--env-manager", "local", "-p", str(port), "-h", "127.0.0.1"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = json.dumps({"dataframe_split": {"columns": ["path"], "data": [[str(scan)]]}}).encode()

    def request():
        req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=120).read())
    try:
        for _ in range(120):
            try:
                served = request()
                break
            except OSError:
                time.sleep(1)
        results["served_request_s"] = _best(request, args.repeats)
        results["served_minus_in_process_p_lesion"] = float(abs(
            served["predictions"][0]["p_lesion"] - float(in_process.predict([str(scan)])["p_lesion"][0])))
    finally:
        server.terminate()
        server.wait(timeout=30)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
