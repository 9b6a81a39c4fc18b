"""Dispatch: which face runs, how backend= and BLIP3O_FAST_BACKEND choose it, and the fallback warning.

Faces are replaced by spies (a fake compiled module for cpu/cuda, a patched kernels module for
triton), so these tests check the choice itself whatever is built on this machine.
"""

import types
import warnings

import pytest
import torch

import blip3o_fast.ops as ops
from blip3o_fast.ops import dispatch


class Spy:
    """Stands in for a kernel function: records the call and writes the reference result."""

    def __init__(self):
        self.calls = 0

    def __call__(self, gate, up, out, *stream):
        self.calls += 1
        out.copy_(ops.swiglu_reference(gate, up))


@pytest.fixture
def spies(monkeypatch):
    """Spy kernels for swiglu_fwd in every face, a fresh warning registry, no env override."""
    faces = {"cpu": Spy(), "cuda": Spy(), "triton": Spy()}
    fake_c = types.SimpleNamespace(has_cuda=lambda: True, swiglu_fwd=faces["cpu"], swiglu_fwd_cuda=faces["cuda"])
    monkeypatch.setattr(dispatch, "_compiled_module", lambda: fake_c)
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: True)
    import blip3o_fast.kernels.swiglu as triton_swiglu

    monkeypatch.setattr(triton_swiglu, "swiglu_fwd", faces["triton"])
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return faces


def inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(5, 9, generator=gen), torch.randn(5, 9, generator=gen)


def calls(faces):
    return {name: spy.calls for name, spy in faces.items()}


def test_available_backends_reports_what_is_built():
    found = ops.available_backends()
    assert found[0] == "torch" and set(found) <= set(ops.BACKENDS)
    assert ("cpu" in found) == (dispatch._compiled_module() is not None)
    assert ("triton" in found) == dispatch._triton_importable()
    if "cuda" in found:
        assert "cpu" in found and dispatch._compiled_module().has_cuda()


def test_available_backends_follows_the_build(spies, monkeypatch):
    assert ops.available_backends() == ["torch", "cpu", "triton", "cuda"]
    monkeypatch.setattr(dispatch, "_compiled_module", lambda: None)
    monkeypatch.setattr(dispatch, "_triton_importable", lambda: False)
    assert ops.available_backends() == ["torch"]


@pytest.mark.parametrize("face", ["cpu", "triton"])
def test_backend_argument_selects_the_face(spies, face):
    gate, up = inputs()
    out = ops.swiglu(gate, up, backend=face)
    assert calls(spies) == {"cpu": 0, "cuda": 0, "triton": 0} | {face: 1}
    torch.testing.assert_close(out, ops.swiglu_reference(gate, up))


def test_torch_backend_runs_the_reference(spies):
    gate, up = inputs()
    out = ops.swiglu(gate, up, backend="torch")
    assert sum(calls(spies).values()) == 0
    torch.testing.assert_close(out, ops.swiglu_reference(gate, up))


def test_cpu_tensors_default_to_the_cpu_face(spies):
    ops.swiglu(*inputs())
    assert calls(spies)["cpu"] == 1


def test_cuda_defaults_name_known_faces_and_kernels():
    assert set(dispatch.CUDA_DEFAULTS.values()) <= set(dispatch.BACKENDS)
    assert set(dispatch.CUDA_DEFAULTS) <= set(dispatch.TRITON_MODULES)  # kernel names, as dispatch sees them
    cuda = torch.device("cuda")
    assert dispatch.default_backend("decode_linear", cuda) == "torch"
    assert dispatch.default_backend("sample_tokens", cuda) == "cuda"
    assert dispatch.default_backend("rms_norm_fwd", cuda) == "triton"
    assert dispatch.default_backend("decode_linear", torch.device("cpu")) == "cpu"


def test_env_var_is_honoured(spies, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    ops.swiglu(*inputs())
    assert calls(spies) == {"cpu": 0, "cuda": 0, "triton": 1}
    monkeypatch.setenv(dispatch.ENV_VAR, "torch")
    ops.swiglu(*inputs())
    assert sum(calls(spies).values()) == 1


def test_backend_argument_beats_env_var(spies, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    ops.swiglu(*inputs(), backend="cpu")
    assert calls(spies) == {"cpu": 1, "cuda": 0, "triton": 0}


def test_unknown_backend_raises(spies, monkeypatch):
    with pytest.raises(ValueError, match="backend"):
        ops.swiglu(*inputs(), backend="tpu")
    monkeypatch.setenv(dispatch.ENV_VAR, "metal")
    with pytest.raises(ValueError, match="metal"):
        ops.swiglu(*inputs())


def test_cuda_on_cpu_tensors_falls_back_with_one_warning(spies):
    gate, up = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outs = [ops.swiglu(gate, up, backend="cuda") for _ in range(3)]
    ours = [w for w in caught if "blip3o_fast" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "swiglu_fwd" in str(ours[0].message) and "cuda" in str(ours[0].message)
    assert sum(calls(spies).values()) == 0
    for out in outs:
        torch.testing.assert_close(out, ops.swiglu_reference(gate, up))


def test_triton_without_interpreter_falls_back(spies, monkeypatch):
    """Launching Triton on CPU tensors fails outside the interpreter, so dispatch must not try."""
    monkeypatch.delenv("TRITON_INTERPRET")
    gate, up = inputs()
    with pytest.warns(UserWarning, match="swiglu_fwd.*triton"):
        out = ops.swiglu(gate, up, backend="triton")
    assert calls(spies)["triton"] == 0
    torch.testing.assert_close(out, ops.swiglu_reference(gate, up))


def test_missing_kernel_falls_back(spies, monkeypatch):
    monkeypatch.setattr(dispatch, "_compiled_module", lambda: types.SimpleNamespace(has_cuda=lambda: False))
    gate, up = inputs()
    with pytest.warns(UserWarning, match="_C has no swiglu_fwd"):
        out = ops.swiglu(gate, up, backend="cpu")
    torch.testing.assert_close(out, ops.swiglu_reference(gate, up))


def test_real_faces_agree():
    """Every built face that runs here gives the reference's result through the public op."""
    from op_testing import face_device, faces_here

    for face in faces_here():
        gate, up = (t.to(face_device(face)) for t in inputs())
        torch.testing.assert_close(ops.swiglu(gate, up, backend=face).cpu(), ops.swiglu_reference(gate, up).cpu())
