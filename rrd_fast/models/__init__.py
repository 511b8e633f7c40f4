"""CIFAR model zoo with RepDistiller-compatible parameter names.

Importing this package registers every family module.
"""

from rrd_fast.models.registry import ModelOutput, UnknownModelError, create_model, feat_shapes, list_models, register_model

from rrd_fast.models import resnet, wrn, vgg, mobilenetv2, shufflenetv1, shufflenetv2, resnetv2  # noqa: F401,E402  (registration)

__all__ = ["ModelOutput", "UnknownModelError", "create_model", "feat_shapes", "list_models", "register_model"]
