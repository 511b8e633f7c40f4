"""The shared plug-in registry, and the registries built on it (pipeline backends, dataset formats, export backends)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from pipelines.errors import DataError, UserError
from pipelines.registry import Registry, UnknownNameError


@dataclass(frozen=True)
class Thing:
    name: str


def _things() -> Registry[Thing]:
    reg: Registry[Thing] = Registry("model")
    for name in ("resnet8", "resnet8x4", "resnet32x4", "wrn_16_2"):
        reg.register(Thing(name))
    return reg


def test_register_takes_the_name_attribute_or_a_given_name() -> None:
    reg: Registry[object] = Registry("backend")
    thing = Thing("a")
    assert reg.register(thing) is thing and reg.get("a") is thing

    @reg.register(name="b")
    def factory() -> None: ...

    assert reg.get("b") is factory
    assert reg.register(len, name="c") is len
    assert reg.names() == ["a", "b", "c"] and len(reg) == 3
    with pytest.raises(TypeError, match="pass name="):
        reg.register(object())


def test_duplicates_are_refused_and_leave_the_registry_unchanged() -> None:
    reg = _things()
    first = reg.get("resnet8")
    with pytest.raises(ValueError, match="model 'resnet8' registered twice"):
        reg.register(Thing("resnet8"))
    with pytest.raises(ValueError, match="model 'wrn_16_2' registered twice"):
        reg.register(Thing("other"), aliases=("wrn_16_2",))
    assert reg.get("resnet8") is first and "other" not in reg


def test_unknown_name_says_which_registry_and_the_closest_name() -> None:
    reg = _things()
    with pytest.raises(UnknownNameError) as info:
        reg.get("resnt8")
    assert str(info.value) == ("unknown model 'resnt8'; did you mean 'resnet8'? "
                               "(known: resnet32x4, resnet8, resnet8x4, wrn_16_2)")
    assert isinstance(info.value, UserError)
    with pytest.raises(UnknownNameError, match=r"^unknown model 'zzz' \(known: "):
        reg.get("zzz")  # nothing close: no hint


def test_setting_and_error_type_shape_the_message() -> None:
    reg: Registry[Thing] = Registry("backend", setting="data.pipeline", error=DataError)
    reg.register(Thing("torch"))
    with pytest.raises(DataError) as info:
        reg.get("troch")
    assert str(info.value) == "data.pipeline: unknown backend 'troch'; did you mean 'torch'? (known: torch)"


def test_aliases_resolve_but_are_not_listed() -> None:
    reg: Registry[Thing] = Registry("backend")
    ort = reg.register(Thing("onnxruntime"), aliases=("onnx", "ort"))
    assert reg.get("onnx") is ort and reg.resolve("ort") == "onnxruntime"
    assert "onnx" in reg and "onnxruntime" in reg and "tensorrt" not in reg
    assert reg.names() == ["onnxruntime"] and list(reg) == ["onnxruntime"]


def test_names_filter_by_shell_pattern() -> None:
    reg = _things()
    assert reg.names("resnet*") == ["resnet32x4", "resnet8", "resnet8x4"]
    assert reg.names("*x4") == ["resnet32x4", "resnet8x4"]
    assert reg.names("resnet?") == ["resnet8"]
    assert reg.names("vgg*") == []
    assert list(reg) == reg.names()


def test_project_registries_refuse_duplicates_and_hint() -> None:
    from export.base import BACKENDS as EXPORT_BACKENDS
    from export.errors import ExportError
    from pipelines.backends import BACKENDS, build_pipeline
    from pipelines.formats import get_format, register_format

    with pytest.raises(ValueError, match="backend 'torch' registered twice"):
        BACKENDS.register(lambda **kw: None, name="torch")
    with pytest.raises(DataError, match="data.pipeline: unknown backend 'dalli'; did you mean 'dali'"):
        build_pipeline("dalli", None, None, None, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dataset format 'cifar100' registered twice"):
        register_format(get_format("cifar100"))
    with pytest.raises(DataError, match="data.format: unknown dataset format 'cifar1000'; did you mean 'cifar100'"):
        get_format("cifar1000")
    with pytest.raises(ValueError, match="backend 'onnx' registered twice"):
        EXPORT_BACKENDS.register(object(), name="onnx")
    with pytest.raises(ExportError, match="--backend: unknown backend 'eagre'; did you mean 'eager'"):
        EXPORT_BACKENDS.get("eagre")
