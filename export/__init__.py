"""Export students to deployable artifacts (eager, ONNX Runtime, AOTInductor, TensorRT) and benchmark them.

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
