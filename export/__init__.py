"""Export students to deployable artifacts (eager, ONNX Runtime, AOTInductor, TensorRT) and benchmark them.

    python -m export RUN_DIR --backend onnxruntime --out artifacts/r8x4-ort
    python -m export RUN_DIR --backend tensorrt --precision fp16 --batch-sizes 1,256 --out artifacts/r8x4-trt
    python -m export.bench RUN_A RUN_B --backends eager,onnxruntime,aotinductor --out bench_out

Precisions by backend and device (anything else is refused with the reason):

    backend      fp32       fp16             bf16       int8
    eager        cpu, cuda  cuda (autocast)  cpu, cuda  -
    onnxruntime  cpu, cuda  cpu, cuda        -          cpu (static QDQ, calibrated on training images)
    aotinductor  cpu, cuda  cuda             cpu, cuda  -
    tensorrt     cuda       cuda             -          cuda (ModelOpt PTQ, torch_tensorrt >= 2.5)

An artifact folder holds the backend's files and `artifact.json` (source checkpoint sha256,
backend, precision, input shape/dtype/normalisation, batch sizes, file sha256s, versions);
`load_artifact` verifies all of it and returns a callable that runs the artifact itself.

Importing this package registers every backend module; none of them imports its runtime
(onnxruntime, torch_tensorrt, ...) until it is used.
"""

from export.base import Backend, ExportSpec, InputSpec, get_backend, list_backends, register_backend
from export.errors import BackendUnavailable, ExportError

from export import eager_backend, ort_backend, aoti_backend, trt_backend  # noqa: F401,E402  (registration)
from export.artifact import Artifact, load_artifact  # noqa: E402
from export.exporter import export_checkpoint, export_model  # noqa: E402

__all__ = [
    "Artifact", "Backend", "BackendUnavailable", "ExportError", "ExportSpec", "InputSpec",
    "export_checkpoint", "export_model", "get_backend", "list_backends", "load_artifact", "register_backend",
]
